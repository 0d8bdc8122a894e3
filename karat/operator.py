"""The KArAt row operator ``sigma: R^N -> R^N`` that replaces softmax (spec section 3)."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .config import KArAtConfig
from .kan import KANLayer
from .simplex import project_to_simplex


# Caches that karat.resample keeps on an operator as plain attributes (run-time resampled operators, their weightless
# skeletons, in-place resampling targets): never in state_dict(), and dropped when the operator is pickled or copied.
RUNTIME_ATTRS = ("_karat_runtime_cache", "_karat_skeletons", "_resampled_to")


class KArAtOperator(nn.Module):
    """``sigma`` for ``num_heads`` heads over ``num_tokens`` keys, evaluated by materialising ``sigma(S)``.

    * modular ``phi1_w2``: ``sigma(s) = W Phi(s)``, ``Phi``: N -> r KAN layer, ``W`` in R^{N x r};
    * modular ``w1_phi2``: ``sigma(s) = Phi(W s)``, ``W`` in R^{r x N}, ``Phi``: r -> N KAN layer;
    * not modular: ``depth`` KAN layers N -> r -> ... -> N (depth 1: one N -> N layer).

    Initialised so that ``Phi`` starts at unit scale and ``sigma(S) V`` at the scale of ``V``.
    """

    def __init__(self, num_heads: int, num_tokens: int, cfg: KArAtConfig) -> None:
        super().__init__()
        self.cfg, self.num_heads, self.num_tokens = cfg, num_heads, num_tokens
        n, r = num_tokens, cfg.hidden_dim
        key_scale = 1.0 / math.sqrt(n)  # outputs indexed by key are summed over N keys against V
        self.mode = cfg.modular_mode if cfg.modular_attn else "depth"
        if self.mode == "phi1_w2":
            self.phi = KANLayer(num_heads, n, r, cfg, init_scale=1.0)
            self.weight = nn.Parameter(torch.randn(num_heads, n, r) * (key_scale / math.sqrt(r)))
        elif self.mode == "w1_phi2":
            self.weight = nn.Parameter(torch.randn(num_heads, r, n) * key_scale)
            self.phi = KANLayer(num_heads, r, n, cfg, init_scale=key_scale)
        else:
            dims = [n] + [r] * (cfg.depth - 1) + [n]
            self.layers = nn.ModuleList(
                KANLayer(num_heads, dims[i], dims[i + 1], cfg, init_scale=key_scale if i == cfg.depth - 1 else 1.0)
                for i in range(cfg.depth))

    def forward(self, logits: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sigma(S)`` row-wise. logits: ``(B, H, N_q, N)``; key_mask: bool broadcastable to it,
        False where a key is masked (it then adds nothing inside ``Phi`` and gets zero weight)."""
        if logits.shape[-1] != self.num_tokens:
            raise ValueError(
                f"KArAt operator was built for {self.num_tokens} key tokens but got {logits.shape[-1]}: its "
                f"weights are indexed by key position. Evaluate it through KArAtCore with the input's "
                f"layout=TokenLayout(prefix, (h, w)), which resamples it (karat.resample.operator_at).")
        if self.mode == "phi1_w2":
            hidden = self.phi(logits, key_mask)
            sigma = torch.einsum("bhir,hjr->bhij", hidden, self.weight.to(hidden.dtype))
        elif self.mode == "w1_phi2":
            s = logits if key_mask is None else logits * key_mask.to(logits.dtype)
            sigma = self.phi(torch.einsum("bhij,hrj->bhir", s, self.weight.to(s.dtype)))
        else:
            sigma = logits
            for i, layer in enumerate(self.layers):
                sigma = layer(sigma, key_mask if i == 0 else None)
        if key_mask is not None:
            sigma = sigma * key_mask.to(sigma.dtype)
        if self.cfg.project_l1:
            sigma = project_to_simplex(sigma, key_mask)
        return sigma

    def __getstate__(self) -> Dict[str, object]:
        return {k: v for k, v in super().__getstate__().items() if k not in RUNTIME_ATTRS}

    def key_axes(self) -> Dict[str, Tuple[int, ...]]:
        """Parameter name -> the axes indexed by key position (what spec section 6 resamples)."""
        if self.mode == "phi1_w2":
            return {"weight": (1,), **{f"phi.{name}": (1,) for name, _ in self.phi.named_parameters()}}
        if self.mode == "w1_phi2":
            return {"weight": (2,), **{f"phi.{name}": (2,) for name, _ in self.phi.named_parameters()}}
        axes: Dict[str, Tuple[int, ...]] = {}
        last = len(self.layers) - 1
        for i in sorted({0, last}):
            for name, _ in self.layers[i].named_parameters():
                axes[f"layers.{i}.{name}"] = ((1,) if i == 0 else ()) + ((2,) if i == last else ())
        return axes

    def extra_repr(self) -> str:
        return f"mode={self.mode}, heads={self.num_heads}, tokens={self.num_tokens}, rank={self.cfg.hidden_dim}"


class OperatorProvider:
    """Hands operators to attention blocks as they are built: a new one per block (blockwise), or the
    same one for every block with the same heads and token count (universal)."""

    def __init__(self, cfg: KArAtConfig) -> None:
        self.cfg = cfg
        self._shared: Dict[Tuple[int, int], KArAtOperator] = {}

    def __call__(self, num_heads: int, num_tokens: int) -> KArAtOperator:
        if not self.cfg.universal:
            return KArAtOperator(num_heads, num_tokens, self.cfg)
        key = (num_heads, num_tokens)
        if key not in self._shared:
            self._shared[key] = KArAtOperator(num_heads, num_tokens, self.cfg)
        return self._shared[key]
