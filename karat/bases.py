"""Learnable univariate bases of a KAN layer (spec section 2).

Every basis owns the basis-specific parameters of all edges of one KAN layer, stacked over heads:
shapes start with ``(heads, in_features, out_features)``. Two families:

* *shared-feature* bases (Fourier, B-spline): ``f_qp(x) = sum_m c_qpm B_m(x)`` with the same functions
  ``B_m`` on every edge, so the layer is a contraction of a feature tensor with the coefficients;
* *per-edge* bases (wavelets with per-edge translation/scale, rationals): each edge evaluates its own
  function, so the reference evaluation builds a ``(..., in, out)`` tensor of edge values.

Every basis evaluates in fp32 (float64 stays float64) whatever the input's or the parameters' dtype, in a form
that stays finite for large inputs; each class states its safe input range. ``KANLayer`` also switches autocast
off around them (``karat.precision``), so a half-precision input only rounds the input, never the evaluation.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .activations import ZeroModule  # noqa: F401  (its home is activations.py; importable from here as before)
from .config import KArAtConfig
from .precision import upcast


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

    def feature_planes(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Tensors shaped like ``x`` that span the features: a graph exporter's layout, where elementwise ops on a
        trailing axis of size M would stride through memory (``karat.kernels.onnx_export``). By default the M
        features themselves (``features(x)[..., m]``); a basis may return another basis of their span, mapped to by
        :meth:`plane_coefficients`. ``keep`` (0/1, broadcastable to x) zeroes every plane where it is 0."""
        planes = list(self.features(x).unbind(-1))
        return planes if keep is None else [p * keep for p in planes]

    def plane_coefficients(self, coef: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Coefficients over the M features, ``(..., M, r)``, as coefficients over :meth:`feature_planes`'s planes
        ``(..., P, r)`` and a constant term ``(..., r)`` (None: no constant): ``sum_m coef_m B_m(x)`` equals
        ``sum_p out_p plane_p(x) + constant``."""
        return coef, None

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
        coef = (self.coefficients[:, edges[0], edges[1]] * scale.unsqueeze(-1)).to(feats.dtype)
        return torch.einsum("bhrim,hiom->bhro", feats, coef)


class FourierBasis(SharedFeatureBasis):
    """``cos(kx), sin(kx)`` for k = 1..G: 2G functions (layout: all cosines, then all sines).

    Safe input range: every finite input (bounded features, bounded derivatives ``k``), evaluated in fp32."""

    _feature_var = 0.5

    def __init__(self, num_heads: int, in_features: int, out_features: int, cfg: KArAtConfig,
                 init_scale: float) -> None:
        super().__init__(num_heads, in_features, out_features)
        self.grid = cfg.grid
        self.num_functions = 2 * cfg.grid
        k = torch.arange(1, cfg.grid + 1, dtype=torch.float64)
        self.register_buffer("frequencies", torch.cat([k, k]), persistent=False)
        self._init_coefficients(init_scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = upcast(x)
        kx = x.unsqueeze(-1) * self.frequencies[: self.grid].to(x.dtype)
        return torch.cat([torch.cos(kx), torch.sin(kx)], dim=-1)

    def fast_features(self, x: torch.Tensor) -> torch.Tensor:
        # Angle-addition recurrence, in place in the output buffer (no temporaries, no concatenation):
        # one cos and one sin, then cos((k+1)x) = cos kx cos x - sin kx sin x,
        # sin((k+1)x) = sin kx cos x + cos kx sin x.
        g = self.grid
        x = upcast(x)
        out = x.new_empty(*x.shape, 2 * g)
        cos1, sin1 = out[..., 0], out[..., g]
        torch.cos(x, out=cos1)
        torch.sin(x, out=sin1)
        for k in range(1, g):
            cos_k, sin_k, cos_prev, sin_prev = out[..., k], out[..., g + k], out[..., k - 1], out[..., g + k - 1]
            torch.mul(cos_prev, cos1, out=cos_k).addcmul_(sin_prev, sin1, value=-1)
            torch.mul(sin_prev, cos1, out=sin_k).addcmul_(cos_prev, sin1)
        return out

    def feature_planes(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        # One cos and one sin per entry (each costs about twelve multiplications in ONNX Runtime, which evaluates
        # them one entry at a time); the other frequencies follow from c = cos x and s = sin x by Chebyshev:
        # cos kx = T_k(c), sin kx = s U_{k-1}(c). Up to POWER_MAX_GRID the planes are the powers c^1..c^G and
        # s c^0..s c^(G-1), one multiplication each (plane_coefficients folds T_k and U_k into the coefficients);
        # above it, T_k(c) and s U_{k-1}(c) themselves by the three-term recurrence (two operations each), whose
        # error does not grow like the power basis's coefficients (about (1 + sqrt 2)^G).
        x = upcast(x)
        c, s = torch.cos(x), torch.sin(x)
        if keep is not None:
            c, s = c * keep, s * keep
        g = self.grid
        if g <= self.POWER_MAX_GRID:
            cos, sin = [c], [s]
            for _ in range(1, g):
                cos.append(cos[-1] * c)
                sin.append(sin[-1] * c)
            return cos + sin
        two_c = c + c
        cos, sin = [c, two_c * c - (1.0 if keep is None else keep)], [s, two_c * s]
        for _ in range(2, g):
            cos.append(two_c * cos[-1] - cos[-2])
            sin.append(two_c * sin[-1] - sin[-2])
        return cos + sin

    POWER_MAX_GRID = 4  # up to this G, feature_planes gives powers of cos x (1 op a plane), else Chebyshev terms

    def plane_coefficients(self, coef: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        g = self.grid
        if g > self.POWER_MAX_GRID:
            return coef, None
        t, u = _chebyshev_to_power(g)

        def combine(rows, part: torch.Tensor, p: int) -> torch.Tensor:  # sum_k rows[k][p] part_k
            # scalar products and sums only: ops an exporter folds into one constant (it does not fold MatMul)
            terms = [part[..., k, :] * rows[k][p] for k in range(g) if rows[k][p]]
            return functools.reduce(torch.add, terms) if terms else torch.zeros_like(part[..., 0, :])

        cos, sin = coef[..., :g, :], coef[..., g:, :]
        planes = [combine(t, cos, p) for p in range(1, g + 1)] + [combine(u, sin, p) for p in range(g)]
        return torch.stack(planes, dim=-2), combine(t, cos, 0)

    def derivative_map(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(perm, scale)`` with ``dB_m/dx = scale_m * B_perm(m)``: d cos kx = -k sin kx, d sin kx = k cos kx."""
        g = self.grid
        perm = torch.cat([torch.arange(g, 2 * g), torch.arange(g)])
        return perm, torch.cat([-self.frequencies[:g], self.frequencies[g:]])


@functools.lru_cache(maxsize=None)
def _chebyshev_to_power(g: int) -> Tuple[Tuple[Tuple[float, ...], ...], Tuple[Tuple[float, ...], ...]]:
    """``(t, u)``: ``T_k(c) = sum_p t[k-1][p] c^p`` (k = 1..g, p = 0..g) and ``U_{k-1}(c) = sum_p u[k-1][p] c^p``
    (p = 0..g-1), from ``T_{k+1} = 2c T_k - T_{k-1}`` (the same for U, with U_1 = 2c). Plain numbers, so that a
    graph exporter records the matrices as constants, not the ops that built them."""
    t = [[1.0] + [0.0] * g, [0.0, 1.0] + [0.0] * (g - 1)]
    u = [[1.0] + [0.0] * g, [0.0, 2.0] + [0.0] * (g - 1)]
    for rows in (t, u):
        for k in range(2, g + 1):
            rows.append([2 * (rows[k - 1][p - 1] if p else 0.0) - rows[k - 2][p] for p in range(g + 1)])
    return tuple(tuple(r) for r in t[1:g + 1]), tuple(tuple(r[:g]) for r in u[:g])


class SplineBasis(SharedFeatureBasis):
    """B-splines of order ``k`` on G uniform intervals of ``grid_range``, extended by k knots each side.

    The knots stay in fp32 whatever the module's dtype: ``model.half()`` would round a float buffer (and a wide
    ``grid_range`` would overflow it), so only their integer positions are stored and the knots are rebuilt in
    fp32 at each call; the Cox-de Boor recursion runs in fp32 too. Safe input range: every finite input (the
    features are 0 outside ``[lo - k h, hi + k h]``, h the knot spacing) for any finite ``grid_range``.
    """

    _feature_var = 0.25

    def __init__(self, num_heads: int, in_features: int, out_features: int, cfg: KArAtConfig,
                 init_scale: float) -> None:
        super().__init__(num_heads, in_features, out_features)
        lo, hi = cfg.grid_range
        self.order = cfg.order
        self.num_functions = cfg.grid + cfg.order
        self._lo, self._step = lo, (hi - lo) / cfg.grid
        # An integer buffer follows .to(device) but no dtype cast (model.half(), .to(torch.bfloat16)).
        self.register_buffer("knot_index", torch.arange(-cfg.order, cfg.grid + cfg.order + 1), persistent=False)
        self._init_coefficients(init_scale)

    @property
    def knots(self) -> torch.Tensor:
        """The ``G + 2k + 1`` knots, in fp32."""
        return self.knot_index.to(torch.float32) * self._step + self._lo

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = upcast(x)
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
# |u| beyond which a wavelet is exactly 0 in fp32, so clamping u there changes no value and no gradient while
# keeping u^2 (and cos, sin of u) finite for any input: exp(-u^2/2) underflows fp32 at |u| > 14.4, and Meyer's
# window is 0 from |u| = 1 on. Shannon's sinc decays like 1/u and is not clamped.
WAVELET_SUPPORT = {"mexican_hat": 16.0, "morlet": 16.0, "dog": 16.0, "meyer": 2.0}
# Smallest |scale| a wavelet divides by: a learnt scale of 0 would turn every input into +-inf.
MIN_WAVELET_SCALE = 1e-3


def _away_from_zero(s: torch.Tensor, eps: float) -> torch.Tensor:
    """``s`` with its magnitude clamped to at least ``eps``, sign kept (0 becomes ``+eps``)."""
    return torch.where(s < 0, s.clamp(max=-eps), s.clamp(min=eps))


class PerEdgeBasis(Basis):
    """A basis whose every edge evaluates its own function (reference path: an ``(..., in, out)`` tensor)."""

    shared_features = False

    def edge_values(self, x: torch.Tensor, edges: EdgeSlice = ALL_EDGES) -> torch.Tensor:
        """``(B, H, R, in) -> (B, H, R, in, out)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, scale: torch.Tensor, input_mask: Optional[torch.Tensor] = None,
                edges: EdgeSlice = ALL_EDGES) -> torch.Tensor:
        values = self.edge_values(x, edges)
        values = values * scale.unsqueeze(1).to(values.dtype)
        if input_mask is not None:
            values = values * input_mask.unsqueeze(-1).to(values.dtype)
        return values.sum(dim=-2)


class WaveletBasis(PerEdgeBasis):
    """One wavelet per edge on ``(x - t_qp) / s_qp`` with learnable translation, scale and weight.

    Evaluated in fp32 with ``|s|`` clamped to at least ``MIN_WAVELET_SCALE`` and ``u`` clamped to the wavelet's
    support (``WAVELET_SUPPORT``), which changes nothing where the wavelet is not 0. Safe input range: every
    finite input for the Mexican hat, Morlet, DoG and Meyer wavelets; Shannon's, every ``|x - t| < 1e35``.
    """

    def __init__(self, num_heads: int, in_features: int, out_features: int, cfg: KArAtConfig,
                 init_scale: float) -> None:
        super().__init__(num_heads, in_features, out_features)
        self.wavelet_type = cfg.wavelet_type
        shape = (num_heads, in_features, out_features)
        self.translation = nn.Parameter(torch.zeros(shape))
        self.scale = nn.Parameter(torch.ones(shape))
        self.coefficients = nn.Parameter(torch.randn(shape) * (init_scale / math.sqrt(in_features * 0.3)))
        shannon = cfg.wavelet_type == "shannon"
        window = torch.hamming_window(in_features, periodic=False) if shannon else torch.ones(in_features)
        self.register_buffer("window", window, persistent=False)

    def edge_values(self, x: torch.Tensor, edges: EdgeSlice = ALL_EDGES) -> torch.Tensor:
        i, o = edges
        x = upcast(x)
        shift = self.translation[:, i, o].unsqueeze(1).to(x.dtype)
        scale = _away_from_zero(self.scale[:, i, o].unsqueeze(1).to(x.dtype), MIN_WAVELET_SCALE)
        u = (x.unsqueeze(-1) - shift) / scale
        support = WAVELET_SUPPORT.get(self.wavelet_type)
        if support is not None:
            u = u.clamp(-support, support)
        psi = WAVELETS[self.wavelet_type](u) * self.window[i].to(x.dtype).unsqueeze(-1)
        return psi * self.coefficients[:, i, o].unsqueeze(1).to(x.dtype)


class RationalBasis(PerEdgeBasis):
    """``P_m(x) / (1 + |sum_{q=1..n} b_q x^q|)`` per edge; the denominator is >= 1, never zero.

    Evaluated in fp32 in a normalised form that never raises x to a power: with ``t = max(1, |x|)``, numerator
    and denominator are divided by ``t^m`` and ``t^n`` (homogeneous Horner in ``x / t`` and ``1 / t``) and the
    ratio is multiplied by ``t^(m - n)``. The same function; for ``|x| <= 1`` the same operations as plain
    Horner. Safe input range: no intermediate overflows or NaNs for ``|x| < 1e11``; the value itself grows like
    ``|a_m / b_n| |x|^(m-n)``, so with m > n it is inf in fp16 exactly where it exceeds 65504 (default (5, 4):
    from ``|x| ~ 65504 |b_4 / a_5|`` on, i.e. a few 1e4 at init), finite in bf16 and fp32. With n = 0 the basis
    is a polynomial: fp16 only while ``|a_m x^m| < 65504``.
    """

    def __init__(self, num_heads: int, in_features: int, out_features: int, cfg: KArAtConfig,
                 init_scale: float) -> None:
        super().__init__(num_heads, in_features, out_features)
        m, n = cfg.rational_order
        self.numerator = nn.Parameter(
            torch.randn(num_heads, in_features, out_features, m + 1) * (init_scale / math.sqrt(in_features * (m + 1))))
        self.denominator = nn.Parameter(torch.randn(num_heads, in_features, out_features, n) * 0.1)

    @staticmethod
    def _horner(x: torch.Tensor, coef: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_i coef_i x^i`` with x ``(B, H, R, in, 1)`` and coef ``(H, 1, in, out, K)``; with ``w`` (shaped
        as x) the homogeneous form ``sum_i coef_i x^i w^(K-1-i)``."""
        acc = coef[..., -1].expand(x.shape[:-1] + coef.shape[-2:-1])
        w_pow = w
        for i in range(coef.shape[-1] - 2, -1, -1):
            if w is None:
                acc = acc * x + coef[..., i]
            else:
                acc = torch.addcmul(acc * x, coef[..., i], w_pow)
                w_pow = w_pow * w
        return acc

    def edge_values(self, x: torch.Tensor, edges: EdgeSlice = ALL_EDGES) -> torch.Tensor:
        i, o = edges
        xe = upcast(x).unsqueeze(-1)
        num = self.numerator[:, i, o].unsqueeze(1).to(xe.dtype)
        if self.denominator.shape[-1] == 0:
            return self._horner(xe, num)
        den = self.denominator[:, i, o].unsqueeze(1).to(xe.dtype)
        # The value does not depend on t (any t > 0 gives the same function), so t carries no gradient: backward
        # differentiates through u = x / t alone, at the cost of plain Horner.
        t = xe.detach().abs().clamp_min(1.0)
        u, w = xe / t, 1.0 / t  # |u| <= 1, w <= 1; exactly x and 1 where |x| <= 1
        m, n = num.shape[-1] - 1, den.shape[-1]
        p = self._horner(u, num, w)  # P(x) / t^m
        q = u * self._horner(u, den, w)  # x Q(x) / t^n
        return p / (w ** n + q.abs()) * t ** (m - n)


BASES = {"FourierBasis": FourierBasis, "SplineBasis": SplineBasis, "WaveletBasis": WaveletBasis,
         "RationalBasis": RationalBasis}


def build_basis(cfg: KArAtConfig, num_heads: int, in_features: int, out_features: int,
                init_scale: float = 1.0) -> Basis:
    return BASES[cfg.basis_type](num_heads, in_features, out_features, cfg, init_scale)
