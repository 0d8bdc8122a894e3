"""A KAN layer applied along the last axis, stacked over attention heads (spec section 2)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .bases import ALL_EDGES, Basis, EdgeSlice, ZeroModule, build_basis
from .config import KArAtConfig, resolve_base_fn
from .precision import full_precision


class KANLayer(nn.Module):
    """``y_p = sum_q w_b[q,p] b(x_q) + w_s[q,p] f_qp(x_q)`` for every head (efficient-KAN convention).

    ``init_scale`` is the standard deviation the outputs start with; the operator sets it so that
    ``sigma(S) V`` starts at the scale of ``V`` whatever the number of tokens.
    """

    def __init__(self, num_heads: int, in_features: int, out_features: int, cfg: KArAtConfig,
                 init_scale: float = 1.0) -> None:
        super().__init__()
        self.num_heads, self.in_features, self.out_features = num_heads, in_features, out_features
        self.base_fn = resolve_base_fn(cfg.base_fn)()
        shape = (num_heads, in_features, out_features)
        self.has_base = not isinstance(self.base_fn, ZeroModule)
        base_init = torch.randn(shape) * (init_scale / math.sqrt(in_features))  # drawn either way: same seeds
        # The zero base has no w_b: a parameter the forward ignores gets no gradient, which fails timm's tests
        # and DDP without find_unused_parameters. karat.paper_param_count adds it back to compare with the paper.
        self.base_weight: Optional[nn.Parameter] = None
        if self.has_base:
            self.base_weight = nn.Parameter(base_init, requires_grad=not cfg.base_not_trainable)
        self.basis_scale = nn.Parameter(torch.ones(shape))
        self.basis: Basis = build_basis(cfg, num_heads, in_features, out_features, init_scale)
        if cfg.basis_not_trainable:
            self.basis_scale.requires_grad_(False)
            for p in self.basis.parameters():
                p.requires_grad_(False)

    @full_precision
    def forward(self, x: torch.Tensor, input_mask: Optional[torch.Tensor] = None,
                edges: EdgeSlice = ALL_EDGES) -> torch.Tensor:
        """x: ``(B, H, R, in)``; input_mask: bool broadcastable to x, False drops that input's edges.

        ``edges`` = (input slice, output slice) evaluates one block of edges only (x holds those inputs):
        the efficient paths sum a layer over blocks of keys without building all edges at once.
        Evaluated in fp32 with autocast off (``karat.precision``); the result comes back in x's dtype."""
        i, o = edges
        y = self.basis(x, self.basis_scale[:, i, o], input_mask, edges)
        if self.has_base:
            base = self.base_fn(x)
            if input_mask is not None:
                base = base * input_mask.to(base.dtype)
            y = y + torch.einsum("bhri,hio->bhro", base, self.base_weight[:, i, o].to(base.dtype))
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before the zero base stopped storing w_b hold an unused one: dropped on load.
        if not self.has_base:
            state_dict.pop(prefix + "base_weight", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, in={self.in_features}, out={self.out_features}, "
                f"basis={type(self.basis).__name__}")
