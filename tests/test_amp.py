"""Mixed precision (issue 14, item 1): every evaluation path, basis and mode runs under bf16 and fp16 autocast,
forward and backward, and stays within stated tolerances of fp32; bf16 parameters work without autocast; the
three pipelines' AMP switches each run a CPU training step as far as CPU autocast allows.

Tolerances are norm-wise relative errors, ``|a - b| / |b|``, against the fp32 evaluation of the same half-precision
inputs. KArAt computes in fp32 inside (``karat.precision``), so what remains is rounding the result to the autocast
dtype: about 2e-3 in bf16 (8 significant bits) and 2.5e-4 in fp16 (11 bits); the bounds leave a factor 4-5.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import require
from karat import KArAtConfig, KArAtCore

ROOT = Path(__file__).resolve().parents[1]
HALF = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
BASES = [
    dict(basis_type="FourierBasis", grid=3),
    dict(basis_type="FourierBasis", grid=2, base_fn="nn.SiLU"),
    dict(basis_type="SplineBasis", grid=4, order=3, grid_range=(-2.0, 2.0)),
    *[dict(basis_type="WaveletBasis", wavelet_type=w) for w in ("mexican_hat", "morlet", "dog", "meyer", "shannon")],
    dict(basis_type="RationalBasis", rational_order=(5, 4)),
]
MODES = [dict(modular_mode="phi1_w2"), dict(modular_mode="w1_phi2"), dict(modular_attn=False, depth=2)]


def _basis_id(b: dict) -> str:
    return b.get("wavelet_type", b["basis_type"]) + b.get("base_fn", "").replace("nn.", "+")


def _mode_id(m: dict) -> str:
    return m.get("modular_mode", "depth2")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _host_inputs(host: str, dtype: torch.dtype, b: int, h: int, n: int, d: int):
    """q, k, v (and a bias) as a host hands them over under autocast: already in the autocast dtype."""
    q, k, v = (torch.randn(b, h, n, d).to(dtype) for _ in range(3))
    bias = keep = None
    if host != "plain":
        bias = (0.5 * torch.randn(1, h, n, n)).to(dtype)  # ViTDet's rel-pos / Swin's table bias
        keep = torch.rand(b, 1, 1, n) > 0.3 if host == "bias+padding" else torch.rand(b, 1, n, n) > 0.3
        keep[..., 0] = True
    return q, k, v, bias, keep


def _run(core: KArAtCore, tensors, keep, grad_out, params, autocast_dtype=None):
    """Output and gradients (inputs, then ``params``) of one call, under autocast when a dtype is given."""
    leaves = [t.detach().requires_grad_() for t in tensors if t is not None]
    q, k, v, *bias = leaves
    with torch.autocast("cpu", autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = core(q, k, v, bias=bias[0] if bias else None, key_mask=keep)
    grads = torch.autograd.grad(out.float(), leaves + params, grad_out)
    return out, grads


@pytest.mark.parametrize("host", ["plain", "bias+padding", "bias+windows"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("basis", BASES, ids=_basis_id)
def test_reference_and_efficient_under_autocast_match_fp32(basis, mode, dtype, host):
    n, b, h, d = 72, 1, 2, 4  # > REFERENCE_MAX_TOKENS: impl='auto' takes the efficient path
    ref = KArAtCore(h, n, KArAtConfig(hidden_dim=3, impl="reference", **basis, **mode))
    eff = KArAtCore(h, n, ref.cfg.replace(impl="auto"), operator_factory=lambda *_: ref.operator)
    assert eff.resolve_impl() == "efficient"
    q, k, v, bias, keep = _host_inputs(host, dtype, b, h, n, d)
    params = [p for p in ref.operator.parameters() if p.requires_grad]
    grad_out = 1e-2 * torch.randn(b, h, n, d)  # a loss-scale-like factor: fp16 gradients stay in range
    want, want_grads = _run(ref, [t if t is None else t.float() for t in (q, k, v, bias)], keep, grad_out, params)
    for core in (ref, eff):
        out, grads = _run(core, (q, k, v, bias), keep, grad_out, params, autocast_dtype=dtype)
        assert out.dtype == dtype  # as F.scaled_dot_product_attention under autocast
        assert _rel(out, want) < TOL[dtype], core.resolve_impl()
        for i, (g, w) in enumerate(zip(grads, want_grads)):
            assert torch.isfinite(g).all() and _rel(g, w) < TOL[dtype], (core.resolve_impl(), i)
        assert [g.dtype for g in grads[:3]] == [dtype] * 3  # input gradients in the inputs' dtype


@pytest.mark.parametrize("impl", ["reference", "efficient"])
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("basis", [BASES[0], BASES[1], BASES[2], BASES[3], BASES[-1]], ids=_basis_id)
def test_bf16_parameters_without_autocast(basis, mode, impl):
    """``model.bfloat16()``: bf16 parameters and inputs, no autocast; compared with the same (rounded) parameters
    in fp32. Parameter gradients are bf16 themselves, hence twice the output bound."""
    n, b, h, d = 72, 1, 2, 4
    core = KArAtCore(h, n, KArAtConfig(hidden_dim=3, impl=impl, **basis, **mode)).bfloat16()
    full = copy.deepcopy(core).float()
    q, k, v, bias, keep = _host_inputs("bias+padding", torch.bfloat16, b, h, n, d)
    grad_out = torch.randn(b, h, n, d)
    params = [p for p in core.operator.parameters() if p.requires_grad]
    out, grads = _run(core, (q, k, v, bias), keep, grad_out, params)
    want, want_grads = _run(full, [t.float() for t in (q, k, v, bias)], keep, grad_out,
                            [p for p in full.operator.parameters() if p.requires_grad])
    assert out.dtype == torch.bfloat16 and _rel(out, want) < TOL[torch.bfloat16]
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all() and _rel(g, w) < 2 * TOL[torch.bfloat16]


VIT_MODES = [dict(modular_mode="phi1_w2"), dict(modular_mode="w1_phi2"), dict(modular_attn=False, karat_depth=2)]


def _vit(img_size: int, **karat):
    import timm

    import karat as _  # noqa: F401  registers the models

    model = timm.create_model("vit_tiny_patch16_224_karat", img_size=img_size, depth=1, embed_dim=32, num_heads=2,
                              num_classes=4, hidden_dim=3, **karat)
    cores = [m for m in model.modules() if isinstance(m, KArAtCore)]
    assert cores and all(c.num_tokens > 64 and c.resolve_impl() == "efficient" for c in cores)
    return model


def _train_step_finite(model, x, dtype):
    with torch.autocast("cpu", dtype):
        out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().logsumexp(-1).mean().backward()
    karat_grads = [p.grad for n, p in model.named_parameters() if ".karat." in n and p.requires_grad]
    assert karat_grads and all(g is not None and torch.isfinite(g).all() for g in karat_grads)
    assert any(g.abs().sum() > 0 for g in karat_grads)
    return out


@pytest.mark.parametrize("mode", VIT_MODES, ids=_mode_id)
@pytest.mark.parametrize("basis", BASES, ids=_basis_id)
def test_issue_reproduction_vit_img_size_128_under_bf16_autocast(basis, mode):
    """The issue's reproduction: a KArAt ViT at img_size=128 (8 x 8 patches + the class token = 65 tokens, so the
    efficient path serves) under ``torch.autocast("cpu", torch.bfloat16)``, forward and backward."""
    model = _vit(128, **basis, **mode)
    x = torch.randn(2, 3, 128, 128)
    out = _train_step_finite(model, x, torch.bfloat16)
    with torch.no_grad():
        assert _rel(out, model(x)) < 5e-2  # end to end: timm's own bf16 layers add their rounding


@pytest.mark.parametrize("basis", [BASES[0], BASES[2]], ids=_basis_id)
def test_vit_img_size_144_under_fp16_autocast(basis):
    """81 + 1 tokens, fp16 (the dtype CUDA AMP uses)."""
    _train_step_finite(_vit(144, **basis), torch.randn(2, 3, 144, 144), torch.float16)


def test_issue_reproduction_full_vit_tiny():
    """The literal command of the issue, the full ViT-Tiny (12 blocks, 192 wide) at img_size=128."""
    import timm

    import karat as _  # noqa: F401

    model = timm.create_model("vit_tiny_patch16_224_karat", img_size=128, num_classes=10)
    _train_step_finite(model, torch.randn(1, 3, 128, 128), torch.bfloat16)


@pytest.mark.parametrize("impl", ["reference", "efficient"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_swin_with_shifted_window_masks_under_autocast(impl, dtype):
    """A host that passes a bias table and per-query masks (shifted windows) through KArAtCore."""
    import timm

    import karat as _  # noqa: F401

    model = timm.create_model("swin_tiny_patch4_window7_224_karat", img_size=32, patch_size=4, window_size=4,
                              embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=5, impl=impl)
    assert any(b.shift_size != (0, 0) for stage in model.layers for b in stage.blocks)
    _train_step_finite(model, torch.randn(2, 3, 32, 32), dtype)


def test_model_bfloat16_vit_on_the_efficient_path():
    model = _vit(128).bfloat16()
    out = model(torch.randn(2, 3, 128, 128, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


FUSED_CHECK = textwrap.dedent("""
    import copy
    import torch
    from karat import KArAtConfig, KArAtCore

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    torch.manual_seed(0)
    n, tol = 20, {torch.bfloat16: 1e-2, torch.float16: 2e-3}
    ref = KArAtCore(2, n, KArAtConfig(grid=2, hidden_dim=5, impl="reference"))
    fus = KArAtCore(2, n, ref.cfg.replace(impl="fused"), operator_factory=lambda *_: ref.operator)
    params = [p for p in ref.operator.parameters() if p.requires_grad]
    g = torch.randn(1, 2, n, 16)
    for dtype in tol:
        q, k, v = (torch.randn(1, 2, n, 16).to(dtype) for _ in range(3))
        assert fus.resolve_impl(q) == "fused"
        leaves = [t.float().requires_grad_() for t in (q, k, v)]
        want = ref(*leaves)
        want_grads = torch.autograd.grad(want, leaves + params, g)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype):
            out = fus(*leaves)
        grads = torch.autograd.grad(out.float(), leaves + params, g)
        assert out.dtype == dtype and rel(out, want) < tol[dtype], rel(out, want)
        for a, b in zip(grads, want_grads):
            assert torch.isfinite(a).all() and rel(a, b) < tol[dtype], rel(a, b)
    half = copy.deepcopy(fus).bfloat16()  # model.bfloat16(): bf16 coefficients go into the kernels as fp32
    out = half(*(t.bfloat16() for t in (q, k, v)))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and all(p.grad.dtype == torch.bfloat16 for p in half.parameters() if p.requires_grad)
    print("fused kernels under autocast match fp32")
""")


@pytest.mark.slow
def test_fused_kernels_under_autocast_in_the_interpreter():
    require("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", FUSED_CHECK], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "match fp32" in proc.stdout
