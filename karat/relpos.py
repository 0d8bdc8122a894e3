"""A relative-position bias kept in its decomposed form (ViTDet / MViTv2), so no path needs it as N x N.

ViTDet adds ``rel_h[b, h, i, a] + rel_w[b, h, i, c]`` to the logit of query ``i`` and key ``(a, c)`` on a
``k_h x k_w`` key grid. Held as its two small terms (``N x (k_h + k_w)`` per head instead of ``N x N``), the fused
kernels add it inside the kernel and return the gradients of both terms; other paths call :meth:`dense`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class DecomposedRelPos:
    """``bias[..., i, a * k_w + c] = rel_h[..., i, a] + rel_w[..., i, c]``.

    rel_h: ``(B, H, N_q, k_h)``; rel_w: ``(B, H, N_q, k_w)`` (autograd flows through both)."""

    rel_h: torch.Tensor
    rel_w: torch.Tensor

    def __post_init__(self) -> None:
        if self.rel_h.shape[:-1] != self.rel_w.shape[:-1] or self.rel_h.dim() != 4:
            raise ValueError(f"DecomposedRelPos needs rel_h (B, H, N, k_h) and rel_w (B, H, N, k_w) with the same "
                             f"leading dims; got {tuple(self.rel_h.shape)} and {tuple(self.rel_w.shape)}")

    @property
    def num_keys(self) -> int:
        return self.rel_h.shape[-1] * self.rel_w.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.rel_h.shape[:-1], self.num_keys))

    def dense(self) -> torch.Tensor:
        """The ``(B, H, N_q, k_h * k_w)`` bias it stands for."""
        return (self.rel_h[..., :, None] + self.rel_w[..., None, :]).flatten(-2)

    def heads(self, start: int, stop: Optional[int]) -> "DecomposedRelPos":
        return DecomposedRelPos(self.rel_h[:, start:stop], self.rel_w[:, start:stop])

    def to(self, dtype: torch.dtype) -> "DecomposedRelPos":
        return DecomposedRelPos(self.rel_h.to(dtype), self.rel_w.to(dtype))


Bias = Union[torch.Tensor, DecomposedRelPos]


def dense_bias(bias: Optional[Bias]) -> Optional[torch.Tensor]:
    """A bias as a tensor (decomposed ones expanded): what the paths without an in-kernel form take."""
    return bias.dense() if isinstance(bias, DecomposedRelPos) else bias
