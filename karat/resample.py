"""Changing the number of tokens of KArAt operators (spec section 6).

The operator's parameters are indexed by key position, so a checkpoint is tied to its token count. To move it
to another layout (another image size, a ViTDet window of 14 x 14 without class token, a 64 x 64 global block):

* prefix tokens (class, registers) are kept, or dropped when the target has none;
* the h x w grid part is resampled bicubically to h' x w', as timm resamples absolute position embeddings;
* every sum over keys keeps its magnitude: the multiplicative weights of grid keys (``weight``, the basis
  scale ``w_s`` and the base weight ``w_b``) are multiplied by ``h w / (h' w')``, so a sum over the new keys
  approximates the old sum over the old keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .operator import KArAtOperator

# Parameter names (last component) that multiply an edge or a key's contribution: rescaled with the key count.
SUM_WEIGHTS = ("weight", "basis_scale", "base_weight")


@dataclass(frozen=True)
class TokenLayout:
    """Keys one attention sees: ``prefix`` non-spatial tokens followed by a row-major ``grid`` of patches."""

    prefix: int
    grid: Tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    @classmethod
    def infer(cls, num_tokens: int, prefix: int) -> "TokenLayout":
        """A square grid after ``prefix`` tokens; a clear error if ``num_tokens`` is not one."""
        side = math.isqrt(max(num_tokens - prefix, 0))
        if num_tokens <= prefix or side * side != num_tokens - prefix:
            raise ValueError(
                f"Cannot resample KArAt weights for {num_tokens} tokens with {prefix} prefix token(s): "
                f"{num_tokens - prefix} is not a square grid of patches. Give the source layout explicitly "
                f"(TokenLayout(prefix, (h, w))).")
        return cls(prefix, (side, side))


def resample_key_axis(t: torch.Tensor, axis: int, src: TokenLayout, dst: TokenLayout, rescale: bool) -> torch.Tensor:
    """Resample axis ``axis`` of ``t`` (indexed by key) from layout ``src`` to ``dst``."""
    if t.shape[axis] != src.num_tokens:
        raise ValueError(f"Tensor has {t.shape[axis]} keys on axis {axis}, the source layout {src} has {src.num_tokens}.")
    if dst.prefix > src.prefix:
        raise ValueError(f"Cannot create prefix tokens: the source has {src.prefix}, the target needs {dst.prefix}.")
    moved = t.movedim(axis, -1)
    prefix = moved[..., : dst.prefix]  # class token first, then registers
    grid = moved[..., src.prefix:]
    if src.grid != dst.grid:
        lead = grid.shape[:-1]
        img = grid.reshape(1, -1, *src.grid).float()
        antialias = dst.grid[0] < src.grid[0] or dst.grid[1] < src.grid[1]
        img = F.interpolate(img, size=dst.grid, mode="bicubic", align_corners=False, antialias=antialias)
        grid = img.reshape(*lead, dst.grid[0] * dst.grid[1]).to(t.dtype)
        if rescale:
            grid = grid * (src.grid[0] * src.grid[1] / (dst.grid[0] * dst.grid[1]))
    return torch.cat([prefix, grid], dim=-1).movedim(-1, axis)


def resample_operator_state(state: Dict[str, torch.Tensor], axes: Dict[str, Tuple[int, ...]], src: TokenLayout,
                            dst: TokenLayout) -> Dict[str, torch.Tensor]:
    """Resample one operator's tensors (names relative to the operator, ``axes`` from ``key_axes()``)."""
    out = dict(state)
    for name, dims in axes.items():
        t = state[name]
        for axis in dims:
            t = resample_key_axis(t, axis, src, dst, rescale=name.split(".")[-1] in SUM_WEIGHTS)
        out[name] = t
    return out


@dataclass
class ResampleReport:
    """What :func:`resample_karat_state_dict` did, for the user to read."""

    resampled: List[str]
    src: Optional[TokenLayout]
    dst: TokenLayout

    def __str__(self) -> str:
        if not self.resampled:
            return "KArAt weights already match the model's token count; nothing resampled."
        return (f"Resampled {len(self.resampled)} KArAt tensors from {self.src.num_tokens} tokens "
                f"({self.src.prefix} prefix + {self.src.grid[0]}x{self.src.grid[1]}) to {self.dst.num_tokens} "
                f"({self.dst.prefix} prefix + {self.dst.grid[0]}x{self.dst.grid[1]}).")


def resample_karat_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module, dst: TokenLayout,
                              src: Optional[TokenLayout] = None, src_prefix: Optional[int] = None
                              ) -> Tuple[Dict[str, torch.Tensor], ResampleReport]:
    """Resample every KArAt operator tensor of ``state_dict`` to the token layout ``dst`` of ``model``.

    ``src`` defaults to a square grid after ``src_prefix`` prefix tokens (default: ``dst.prefix``), inferred
    from the checkpoint's token count. Tensors of other modules are returned unchanged.
    """
    out = dict(state_dict)
    resampled: List[str] = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, KArAtOperator):
            continue
        axes = module.key_axes()
        names = {f"{prefix}.{n}": n for n in axes}
        present = [full for full in names if full in state_dict]
        if not present:
            continue
        n_src = state_dict[present[0]].shape[axes[names[present[0]]][0]]
        if n_src == dst.num_tokens and (src is None or src == dst):
            continue
        layout = src or TokenLayout.infer(n_src, dst.prefix if src_prefix is None else src_prefix)
        local = {names[full]: state_dict[full] for full in present}
        new = resample_operator_state(local, {names[f]: axes[names[f]] for f in present}, layout, dst)
        for full in present:
            out[full] = new[names[full]]
        resampled.extend(present)
        src = layout
    return out, ResampleReport(resampled, src, dst)
