"""Every basis stays finite, values and gradients, for inputs up to 1e4 in fp16 and bf16 (issue 14, item 2), and
the stable forms are the same functions as the plain formulas in the normal range."""
import copy
import math

import pytest
import torch

from karat import KArAtConfig, KANLayer
from karat.bases import WAVELETS

BASES = [
    dict(basis_type="FourierBasis", grid=3),
    dict(basis_type="SplineBasis", grid=5, order=3),
    dict(basis_type="SplineBasis", grid=4, order=2, grid_range=(-1e5, 1e5)),  # knots beyond fp16's range
    *[dict(basis_type="WaveletBasis", wavelet_type=w) for w in WAVELETS],
    dict(basis_type="RationalBasis", rational_order=(5, 4)),
    dict(basis_type="RationalBasis", rational_order=(3, 3)),
]
HALF = [torch.float16, torch.bfloat16]


def _ids(b):
    return "-".join(str(v) for k, v in b.items() if k != "basis_type") or b["basis_type"]


def _sweep(dtype: torch.dtype) -> torch.Tensor:
    """``(1, 1, R, 2)``: 0, tiny, the fp16 x^5 overflow point (12), and every decade up to 1e4, both signs."""
    mags = torch.tensor([0.0, 1e-3, 0.5, 1.0, 3.0, 11.9, 12.0, 30.0, 100.0, 1e3, 4321.0, 1e4])
    x = torch.cat([mags, -mags, torch.linspace(-1e4, 1e4, 41)])
    return torch.stack([x, x.flip(0)], dim=-1)[None, None].to(dtype)


def _assert_finite_everywhere(layer: KANLayer, x: torch.Tensor, autocast: bool) -> None:
    """Finite outputs and gradients; where the exact value itself exceeds the dtype's range (a rational with
    deg P > deg Q grows like |x|^(m-n)), inf exactly there and never NaN."""
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", x.dtype, enabled=autocast):
        y = layer(x)
    assert y.dtype == x.dtype and not y.isnan().any()
    exact = copy.deepcopy(layer).double()(x.detach().double()).abs()
    top = torch.finfo(x.dtype).max
    bad = (torch.isfinite(y) & (exact > top * (1 + 2 ** -8))) | (~torch.isfinite(y) & (exact < top * (1 - 2 ** -8)))
    assert not bad.any(), f"outputs {y[bad]} (exact {exact[bad]}) at inputs {x[..., 0][bad.any(-1)]}"
    y.float().mean().backward()  # a mean, as a loss is: a sum over 100 inputs of 1e4 would overflow fp16 itself
    assert torch.isfinite(x.grad).all(), f"non-finite input gradients at {x[~torch.isfinite(x.grad)]}"
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("params", ["fp32 params + autocast", "half params"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("basis", BASES, ids=_ids)
def test_every_basis_is_finite_for_inputs_up_to_1e4(basis, dtype, params):
    layer = KANLayer(1, 2, 3, KArAtConfig(**basis))
    if params == "half params":
        layer = layer.to(dtype)
    _assert_finite_everywhere(layer, _sweep(dtype), autocast=params != "half params")


def test_wavelet_scale_of_zero_is_clamped_not_divided_by():
    layer = KANLayer(1, 2, 3, KArAtConfig(basis_type="WaveletBasis", wavelet_type="dog"))
    with torch.no_grad():
        layer.basis.scale.zero_()
        layer.basis.scale[0, 0, 0] = -0.0
    _assert_finite_everywhere(layer, _sweep(torch.float16), autocast=True)
    _assert_finite_everywhere(layer, torch.linspace(-5, 5, 11).view(1, 1, -1, 1).expand(1, 1, 11, 2), autocast=False)


def _plain_rational(basis, x):
    """The textbook formula in float64, no normalisation."""
    num, den = basis.numerator.double(), basis.denominator.double()
    xe = x.double()[..., None, None]  # (R, in, 1, 1)
    p = sum(num[0, ..., i] * xe[..., 0] ** i for i in range(num.shape[-1]))
    q = sum(den[0, ..., j] * xe[..., 0] ** (j + 1) for j in range(den.shape[-1]))
    return p / (1 + q.abs())


def _plain_wavelet(basis, x):
    u = (x.double()[..., None] - basis.translation[0].double()) / basis.scale[0].double()
    return WAVELETS[basis.wavelet_type](u) * basis.coefficients[0].double() * basis.window.double()[:, None]


@pytest.mark.parametrize("basis", [b for b in BASES if b["basis_type"] in ("WaveletBasis", "RationalBasis")], ids=_ids)
def test_stable_forms_are_the_plain_formulas(basis):
    """Far from overflow the clamps and the normalisation change nothing (checkpoints keep their meaning)."""
    layer = KANLayer(1, 2, 3, KArAtConfig(**basis)).double()
    plain = _plain_rational
    if basis["basis_type"] == "WaveletBasis":
        plain = _plain_wavelet
        with torch.no_grad():  # translations and scales away from their init, so that u covers [-14, 14]
            layer.basis.translation.uniform_(-1, 1)
            layer.basis.scale.uniform_(0.5, 1.5)
    x = torch.linspace(-6, 6, 97, dtype=torch.float64)[:, None].expand(97, 2)
    want = plain(layer.basis, x)
    torch.testing.assert_close(layer.basis.edge_values(x[None, None])[0, 0], want, rtol=1e-12, atol=1e-300)


def test_rational_is_bit_identical_to_horner_where_abs_x_le_1():
    layer = KANLayer(2, 3, 4, KArAtConfig(basis_type="RationalBasis"))
    x = torch.rand(1, 2, 50, 3) * 2 - 1
    b = layer.basis
    xe = x.unsqueeze(-1)
    p = b._horner(xe, b.numerator.unsqueeze(1))
    q = xe * b._horner(xe, b.denominator.unsqueeze(1))
    assert torch.equal(b.edge_values(x), p / (1 + q.abs()))


def test_spline_knots_stay_fp32_under_half():
    cfg = KArAtConfig(basis_type="SplineBasis", grid=3, grid_range=(-1.0, 1.0))
    full = KANLayer(1, 2, 2, cfg).basis
    half = KANLayer(1, 2, 2, cfg).half().basis
    assert half.knots.dtype == torch.float32 and torch.equal(half.knots, full.knots)
    assert not torch.equal(half.knots, half.knots.half().float())  # fp16 would have rounded them (h = 2/3)


@pytest.mark.parametrize("bad", [(-math.inf, 1.0), (0.0, math.inf), (math.nan, 1.0), (-math.inf, math.inf),
                                 (-3e308, 3e308)])
def test_non_finite_grid_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"grid_range=.*must be finite"):
        KArAtConfig(grid_range=bad)


def test_rational_gradients_are_exact_beyond_abs_x_1():
    """The normalisation t = max(1, |x|) carries no gradient (the function does not depend on it): gradcheck."""
    layer = KANLayer(1, 2, 2, KArAtConfig(basis_type="RationalBasis", rational_order=(4, 3))).double()
    x = torch.tensor([[-30.0, -2.5], [-0.5, 0.7], [1.5, 40.0]], dtype=torch.float64)[None, None].requires_grad_()
    params = [layer.basis.numerator, layer.basis.denominator]
    assert torch.autograd.gradcheck(lambda x, *p: layer.basis.edge_values(x), (x, *params))
