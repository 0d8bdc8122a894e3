"""Fitting a checkpoint's absolute position embedding to a model's patch grid and class-token slot.

One function for every host: the patch part is resampled with timm's ``resample_abs_pos_embed`` (bicubic, as
timm and spec section 6 resample), a class-token slot is kept, dropped, or (where the host allows) added as zero.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch


def _square_prefix(n: int) -> Tuple[int, Tuple[int, int]]:
    for prefix in (0, 1):  # a position embedding without, then with, a class-token slot
        side = math.isqrt(max(n - prefix, 0))
        if side > 0 and side * side == n - prefix:
            return prefix, (side, side)
    raise ValueError(f"pos_embed of the checkpoint has {n} positions: not a square patch grid (with or without a "
                     f"class token), so its grid cannot be told; give the source grid (src_grid=(h, w)).")


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
        prefix, src = _square_prefix(n)
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
