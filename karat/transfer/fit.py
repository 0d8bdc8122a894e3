"""Fitting a checkpoint's absolute position embedding to a model's patch grid and class-token slot.

One function for every host: the patch part is resampled with timm's ``resample_abs_pos_embed`` (bicubic, as
timm and spec section 6 resample), a class-token slot is kept, dropped, or (where the host allows) added as zero.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from ..resample import TokenLayout


def square_layout(num_tokens: int, what: str = "pos_embed", fix: str = "") -> TokenLayout:
    """The token layout ``num_tokens`` implies when nothing else says it: a square grid of patches, with a class
    token in front when the count is a square plus one (position embeddings, mmseg's KArAt operators)."""
    for prefix in (0, 1):
        side = math.isqrt(max(num_tokens - prefix, 0))
        if side > 0 and side * side == num_tokens - prefix:
            return TokenLayout(prefix, (side, side))
    raise ValueError(f"{what} of the checkpoint: {num_tokens} tokens, neither a square grid of patches nor one "
                     f"plus a class token, so it cannot be resampled to this model's tokens. {fix}".rstrip())


def fit_pos_embed(pos: torch.Tensor, grid: Sequence[int], cls_slot: bool, *, src_grid: Optional[Sequence[int]] = None,
                  interpolation: str = "bicubic", antialias: bool = True,
                  missing_cls: Optional[str] = None) -> Tuple[torch.Tensor, List[str]]:
    """``pos`` (1, N, C) for a model with a ``grid`` (h, w) of patches behind a class-token slot (``cls_slot``).

    The source grid is ``src_grid``, or inferred from N (a square, or a square plus a class-token slot). A
    source without a class-token slot for a model with one gets a zero slot, unless ``missing_cls`` is given:
    then that is an error ending with ``missing_cls`` (the fix). Returns the tensor and notes for the user."""
    from timm.layers import resample_abs_pos_embed

    n = pos.shape[1]
    grid = (int(grid[0]), int(grid[1]))
    if src_grid is None:
        layout = square_layout(n, fix="Give the source grid (src_grid=(h, w)).")
        prefix, src = layout.prefix, layout.grid
    else:
        src = (int(src_grid[0]), int(src_grid[1]))
        prefix = n - src[0] * src[1]
        if prefix < 0:
            raise ValueError(f"pos_embed of the checkpoint has {n} positions, fewer than its {src[0]}x{src[1]} "
                             f"patches: the checkpoint's token layout is not what it says.")
    notes: List[str] = []
    patches = pos[:, prefix:]
    if src != grid:
        patches = resample_abs_pos_embed(patches, new_size=list(grid), old_size=list(src), num_prefix_tokens=0,
                                         interpolation=interpolation, antialias=antialias)
        notes.append(f"pos_embed resampled from {src[0]}x{src[1]} to {grid[0]}x{grid[1]} patches")
    if not cls_slot:
        return patches, notes
    if prefix:
        cls = pos[:, :1]
    elif missing_cls is not None:
        raise ValueError(f"The model expects a class-token position but the checkpoint's pos_embed has none: "
                         f"{missing_cls}")
    else:
        cls = pos.new_zeros(1, 1, pos.shape[2])
        notes.insert(0, "pos_embed had no class-token slot; a zero one was added")
    return torch.cat([cls, patches], dim=1), notes
