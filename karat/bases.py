"""Learnable univariate bases of a KAN layer (spec section 2).

Every basis owns the basis-specific parameters of all edges of one KAN layer, stacked over heads:
shapes start with ``(heads, in_features, out_features)``. Two families:

* *shared-feature* bases (Fourier, B-spline): ``f_qp(x) = sum_m c_qpm B_m(x)`` with the same functions
  ``B_m`` on every edge, so the layer is a contraction of a feature tensor with the coefficients;
* *per-edge* bases (wavelets with per-edge translation/scale, rationals): each edge evaluates its own
  function, so the reference evaluation builds a ``(..., in, out)`` tensor of edge values.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .activations import ZeroModule  # noqa: F401  (its home is activations.py; importable from here as before)
from .config import KArAtConfig


# Which edges to evaluate: (input slice, output slice). Efficient paths evaluate a layer block by block.
EdgeSlice = Tuple[slice, slice]
ALL_EDGES: EdgeSlice = (slice(None), slice(None))


class Basis(nn.Module):
    """Sum over inputs of the basis part of every edge function: ``y_p = sum_q scale_qp f_qp(x_q)``."""

    shared_features: bool = True

    def __init__(self, num_heads: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num_heads, self.in_features, self.out_features = num_heads, in_features, out_features

    def forward(self, x: torch.Tensor, scale: torch.Tensor, input_mask: Optional[torch.Tensor] = None,
                edges: EdgeSlice = ALL_EDGES) -> torch.Tensor:
        """x: ``(B, H, R, in)``, scale: ``(H, in, out)``, input_mask: bool broadcastable to x -> ``(B, H, R, out)``.

        With ``edges`` only that block of edges is evaluated (x and scale then hold just those inputs)."""
        raise NotImplementedError


class SharedFeatureBasis(Basis):
    """A basis whose functions are the same on every edge; only the coefficients ``c_qpm`` differ."""

    num_functions: int

    def _init_coefficients(self, init_scale: float) -> None:
        std = init_scale / math.sqrt(self.in_features * self.num_functions * self._feature_var)
        self.coefficients = nn.Parameter(
            torch.randn(self.num_heads, self.in_features, self.out_features, self.num_functions) * std)

    _feature_var: float = 1.0  # E[B_m(x)^2], so that outputs start with the variance init_scale^2

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., in, M)``."""
        raise NotImplementedError

    def fast_features(self, x: torch.Tensor) -> torch.Tensor:
        """The same values as ``features``, computed the fastest way without autograd in mind."""
        return self.features(x)

    def derivative_map(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(perm, scale)`` when every derivative is a scaled feature, ``dB_m/dx = scale_m B_perm(m)``
        (then backward needs no new function evaluations); None otherwise."""
        return None

    def features_vjp(self, x: torch.Tensor, grad_feats: torch.Tensor) -> torch.Tensor:
        """``sum_m grad_feats_m * dB_m/dx`` at ``x``, by differentiating ``features`` with autograd."""
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(self.features(x), x, grad_feats)
        return grad

    def forward(self, x: torch.Tensor, scale: torch.Tensor, input_mask: Optional[torch.Tensor] = None,
                edges: EdgeSlice = ALL_EDGES) -> torch.Tensor:
        feats = self.features(x)
        if input_mask is not None:
            feats = feats * input_mask.unsqueeze(-1).to(feats.dtype)
        coef = self.coefficients[:, edges[0], edges[1]] * scale.unsqueeze(-1)
        return torch.einsum("bhrim,hiom->bhro", feats, coef)


class FourierBasis(SharedFeatureBasis):
    """``cos(kx), sin(kx)`` for k = 1..G: 2G functions (layout: all cosines, then all sines)."""

    _feature_var = 0.5

    def __init__(self, num_heads: int, in_features: int, out_features: int, cfg: KArAtConfig, init_scale: float) -> None:
        super().__init__(num_heads, in_features, out_features)
        self.grid = cfg.grid
        self.num_functions = 2 * cfg.grid
        k = torch.arange(1, cfg.grid + 1, dtype=torch.float64)
        self.register_buffer("frequencies", torch.cat([k, k]), persistent=False)
        self._init_coefficients(init_scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        kx = x.unsqueeze(-1) * self.frequencies[: self.grid].to(x.dtype)
        return torch.cat([torch.cos(kx), torch.sin(kx)], dim=-1)

    def fast_features(self, x: torch.Tensor) -> torch.Tensor:
        # Angle-addition recurrence, in place in the output buffer (no temporaries, no concatenation):
        # one cos and one sin, then cos((k+1)x) = cos kx cos x - sin kx sin x, sin((k+1)x) = sin kx cos x + cos kx sin x.
        g = self.grid
        out = x.new_empty(*x.shape, 2 * g)
        cos1, sin1 = out[..., 0], out[..., g]
        torch.cos(x, out=cos1)
        torch.sin(x, out=sin1)
        for k in range(1, g):
            cos_k, sin_k, cos_prev, sin_prev = out[..., k], out[..., g + k], out[..., k - 1], out[..., g + k - 1]
            torch.mul(cos_prev, cos1, out=cos_k).addcmul_(sin_prev, sin1, value=-1)
            torch.mul(sin_prev, cos1, out=sin_k).addcmul_(cos_prev, sin1)
        return out

    def derivative_map(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(perm, scale)`` with ``dB_m/dx = scale_m * B_perm(m)``: d cos kx = -k sin kx, d sin kx = k cos kx."""
        g = self.grid
        perm = torch.cat([torch.arange(g, 2 * g), torch.arange(g)])
        return perm, torch.cat([-self.frequencies[:g], self.frequencies[g:]])

class SplineBasis(SharedFeatureBasis):
    """B-splines of order ``k`` on G uniform intervals of ``grid_range``, extended by k knots each side."""

    _feature_var = 0.25

    def __init__(self, num_heads: int, in_features: int, out_features: int, cfg: KArAtConfig, init_scale: float) -> None:
        super().__init__(num_heads, in_features, out_features)
        lo, hi = cfg.grid_range
        self.order = cfg.order
        self.num_functions = cfg.grid + cfg.order
        h = (hi - lo) / cfg.grid
        knots = torch.arange(-cfg.order, cfg.grid + cfg.order + 1, dtype=torch.float32) * h + lo
        self.register_buffer("knots", knots, persistent=False)
        self._init_coefficients(init_scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        g = self.knots.to(x.dtype)
        x = x.unsqueeze(-1)
        bases = ((x >= g[:-1]) & (x < g[1:])).to(x.dtype)
        for j in range(1, self.order + 1):
            left = (x - g[: -(j + 1)]) / (g[j:-1] - g[: -(j + 1)]) * bases[..., :-1]
            right = (g[j + 1:] - x) / (g[j + 1:] - g[1:(-j)]) * bases[..., 1:]
            bases = left + right
        return bases


def _meyer_aux(v: torch.Tensor) -> torch.Tensor:
    nu = lambda t: t ** 4 * (35 - 84 * t + 70 * t ** 2 - 20 * t ** 3)  # noqa: E731
    mid = torch.cos(math.pi / 2 * nu(2 * v.clamp(0.5, 1.0) - 1))
    return torch.where(v <= 0.5, torch.ones_like(v), torch.where(v >= 1.0, torch.zeros_like(v), mid))


WAVELETS = {
    "mexican_hat": lambda u: 2 / (math.pi ** 0.25 * math.sqrt(3)) * (1 - u ** 2) * torch.exp(-u ** 2 / 2),
    "morlet": lambda u: torch.cos(5 * u) * torch.exp(-u ** 2 / 2),
    "dog": lambda u: u * torch.exp(-u ** 2 / 2),
    "meyer": lambda u: torch.sin(math.pi * u.abs()) * _meyer_aux(u.abs()),
    "shannon": lambda u: torch.sinc(u / math.pi),  # times a Hamming window over the inputs (below)
}


class PerEdgeBasis(Basis):
    """A basis whose every edge evaluates its own function (reference path: an ``(..., in, out)`` tensor)."""

    shared_features = False

    def edge_values(self, x: torch.Tensor, edges: EdgeSlice = ALL_EDGES) -> torch.Tensor:
        """``(B, H, R, in) -> (B, H, R, in, out)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, scale: torch.Tensor, input_mask: Optional[torch.Tensor] = None,
                edges: EdgeSlice = ALL_EDGES) -> torch.Tensor:
        values = self.edge_values(x, edges) * scale.unsqueeze(1)
        if input_mask is not None:
            values = values * input_mask.unsqueeze(-1).to(values.dtype)
        return values.sum(dim=-2)


class WaveletBasis(PerEdgeBasis):
    """One wavelet per edge on ``(x - t_qp) / s_qp`` with learnable translation, scale and weight."""

    def __init__(self, num_heads: int, in_features: int, out_features: int, cfg: KArAtConfig, init_scale: float) -> None:
        super().__init__(num_heads, in_features, out_features)
        self.wavelet_type = cfg.wavelet_type
        shape = (num_heads, in_features, out_features)
        self.translation = nn.Parameter(torch.zeros(shape))
        self.scale = nn.Parameter(torch.ones(shape))
        self.coefficients = nn.Parameter(torch.randn(shape) * (init_scale / math.sqrt(in_features * 0.3)))
        window = torch.hamming_window(in_features, periodic=False) if cfg.wavelet_type == "shannon" else torch.ones(in_features)
        self.register_buffer("window", window, persistent=False)

    def edge_values(self, x: torch.Tensor, edges: EdgeSlice = ALL_EDGES) -> torch.Tensor:
        i, o = edges
        u = (x.unsqueeze(-1) - self.translation[:, i, o].unsqueeze(1)) / self.scale[:, i, o].unsqueeze(1)
        psi = WAVELETS[self.wavelet_type](u) * self.window[i].to(x.dtype).unsqueeze(-1)
        return psi * self.coefficients[:, i, o].unsqueeze(1)


class RationalBasis(PerEdgeBasis):
    """``P_m(x) / (1 + |sum_{q=1..n} b_q x^q|)`` per edge; the denominator is >= 1, never zero."""

    def __init__(self, num_heads: int, in_features: int, out_features: int, cfg: KArAtConfig, init_scale: float) -> None:
        super().__init__(num_heads, in_features, out_features)
        m, n = cfg.rational_order
        self.numerator = nn.Parameter(
            torch.randn(num_heads, in_features, out_features, m + 1) * (init_scale / math.sqrt(in_features * (m + 1))))
        self.denominator = nn.Parameter(torch.randn(num_heads, in_features, out_features, n) * 0.1)

    @staticmethod
    def _horner(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """``sum_i coef_i x^i`` with x ``(B, H, R, in, 1)`` and coef ``(H, 1, in, out, K)``."""
        acc = coef[..., -1].expand(x.shape[:-1] + coef.shape[-2:-1])
        for i in range(coef.shape[-1] - 2, -1, -1):
            acc = acc * x + coef[..., i]
        return acc

    def edge_values(self, x: torch.Tensor, edges: EdgeSlice = ALL_EDGES) -> torch.Tensor:
        i, o = edges
        xe = x.unsqueeze(-1)
        p = self._horner(xe, self.numerator[:, i, o].unsqueeze(1))
        if self.denominator.shape[-1] == 0:
            return p
        q = xe * self._horner(xe, self.denominator[:, i, o].unsqueeze(1))
        return p / (1 + q.abs())


BASES = {"FourierBasis": FourierBasis, "SplineBasis": SplineBasis, "WaveletBasis": WaveletBasis,
         "RationalBasis": RationalBasis}


def build_basis(cfg: KArAtConfig, num_heads: int, in_features: int, out_features: int, init_scale: float = 1.0) -> Basis:
    return BASES[cfg.basis_type](num_heads, in_features, out_features, cfg, init_scale)
