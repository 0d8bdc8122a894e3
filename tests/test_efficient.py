"""The memory-efficient path computes exactly the reference function (float64), gradients included."""
import pytest
import torch

from conftest import assert_grads_close, require_cpu_kernel
from karat import KArAtConfig, KArAtCore
from karat.kernels import REFERENCE_MAX_TOKENS
from karat.kernels import efficient

BASES = [
    dict(basis_type="FourierBasis", grid=3),
    dict(basis_type="FourierBasis", grid=2, base_fn="nn.SiLU"),
    dict(basis_type="SplineBasis", grid=4, order=3, grid_range=(-3.0, 3.0)),
    dict(basis_type="WaveletBasis", wavelet_type="mexican_hat"),
    dict(basis_type="WaveletBasis", wavelet_type="shannon"),
    dict(basis_type="RationalBasis", rational_order=(4, 3)),
]
MODES = [dict(modular_mode="phi1_w2"), dict(modular_mode="w1_phi2"), dict(modular_attn=False, depth=2)]
MASKS = ["none", "keys", "queries"]


def _masks(kind, b, n):
    if kind == "none":
        return None
    if kind == "keys":  # padding: the same keys masked for every query
        keep = torch.rand(b, 1, 1, n) > 0.3
    else:  # Swin's shifted windows: a mask per query
        keep = torch.rand(b, 1, n, n) > 0.3
    keep[..., 0] = True
    return keep


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.get("modular_mode", "depth2"))
@pytest.mark.parametrize("basis", BASES, ids=lambda b: b.get("wavelet_type", b["basis_type"]) + b.get("base_fn", ""))
def test_efficient_equals_reference(basis, mode, bias, mask, monkeypatch):
    monkeypatch.setattr(efficient, "KEY_BLOCK", 4)  # several key blocks even at small N
    n, b, h, d = 11, 2, 2, 4
    ref = KArAtCore(h, n, KArAtConfig(hidden_dim=3, impl="reference", **basis, **mode)).double()
    eff = KArAtCore(h, n, ref.cfg.replace(impl="efficient"), operator_factory=lambda *_: ref.operator).double()
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias_t = torch.randn(1, h, n, n, dtype=torch.float64, requires_grad=True) if bias else None
    keep = _masks(mask, b, n)
    out_ref = ref(q, k, v, bias=bias_t, key_mask=keep)
    out_eff = eff(q, k, v, bias=bias_t, key_mask=keep)
    torch.testing.assert_close(out_eff, out_ref)
    inputs = [q, k, v] + ([bias_t] if bias else []) + [p for p in ref.operator.parameters() if p.requires_grad]
    g = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, inputs, g, allow_unused=True)
    grads_eff = torch.autograd.grad(out_eff, inputs, g, allow_unused=True)
    assert_grads_close(grads_eff, grads_ref)


def test_auto_picks_efficient_unless_the_matrix_is_needed_or_small():
    n = max(REFERENCE_MAX_TOKENS.values()) + 1
    core = KArAtCore(2, n, KArAtConfig())
    assert core.resolve_impl() == "efficient"
    core.export_attention = True
    assert core.resolve_impl() == "reference"
    assert KArAtCore(2, n, KArAtConfig(project_l1=True)).resolve_impl() == "reference"
    assert KArAtCore(2, n, KArAtConfig(modular_attn=False, depth=3)).resolve_impl() == "reference"
    dropout = KArAtCore(2, n, KArAtConfig(), attn_drop=0.1)
    assert dropout.resolve_impl() == "reference" and dropout.eval().resolve_impl() == "efficient"
    assert KArAtCore(2, 49, KArAtConfig()).resolve_impl() == "reference"  # no input: the PyTorch path's crossover
    assert KArAtCore(2, 49, KArAtConfig(impl="efficient")).resolve_impl() == "efficient"  # unless asked


def test_auto_gives_small_windows_to_the_cpu_kernel_past_its_crossover():
    """A Swin window (49 keys, bias table, shift mask) runs the C++ kernel, measured faster and leaner than the
    materialised matrix there (benchmarks/README.md); a matrix below the kernel's crossover stays materialised."""
    require_cpu_kernel()
    most = REFERENCE_MAX_TOKENS["C++ CPU kernel"]
    window = KArAtCore(3, 49, KArAtConfig())
    q = torch.randn(2, 3, 49, 32)
    bias, keep = torch.randn(3, 49, 49), torch.rand(2, 1, 49, 49) > 0.2
    choice = window.choose_path(q, bias, keep)
    assert (choice.path, choice.detail) == ("efficient", "C++ CPU kernel")
    small = KArAtCore(3, most, KArAtConfig()).choose_path(q[:, :, :most], bias[:, :most, :most])
    assert small.path == "reference" and f"{most} keys <= {most}" in small.passed_over["efficient"]
    pytorch = KArAtCore(3, 49, KArAtConfig(basis_type="RationalBasis")).choose_path(q)
    assert pytorch.path == "reference"  # no C++ kernel for this basis: the PyTorch path's crossover, 64


def test_efficient_refuses_what_it_cannot_serve():
    core = KArAtCore(2, 9, KArAtConfig(impl="efficient", project_l1=True))
    q = torch.randn(1, 2, 9, 4)
    with pytest.raises(ValueError, match="impl='efficient' cannot serve.*project_l1"):
        core(q, q, q)
