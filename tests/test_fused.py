"""The fused Triton kernels against the reference, on the CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the check runs in a fresh process.
"""
import os
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import torch
    from karat import KArAtConfig, KArAtCore
    from karat.relpos import DecomposedRelPos

    torch.manual_seed(0)

    def check(n, grid, r, base="ZeroModule", bias=None, mask=None, relpos=None, heads=2, batch=2, **options):
        cfg = KArAtConfig(grid=grid, hidden_dim=r, base_fn=base, **options)
        ref = KArAtCore(heads, n, cfg.replace(impl="reference"))
        with torch.no_grad():  # trained-looking coefficients, not the small initial ones
            for p in ref.operator.parameters():
                p.mul_(3.0)
        fus = KArAtCore(heads, n, cfg.replace(impl="fused"), operator_factory=lambda *_: ref.operator)
        q, k, v = (torch.randn(batch, heads, n, 16, requires_grad=True) for _ in range(3))
        extra, b_ref, b_fus = [], None, None
        if bias == "dense":  # a bias table shared by the batch, with its gradient
            b_ref = b_fus = (torch.randn(1, heads, n, n) * 0.5).requires_grad_()
            extra = [b_ref]
        if relpos:  # ViTDet's decomposed rel-pos: the fused path gets the two terms, the reference the sum
            rel = DecomposedRelPos(*((torch.randn(batch, heads, n, kk) * 0.5).requires_grad_() for kk in relpos))
            b_ref, b_fus, extra = rel.dense(), rel, [rel.rel_h, rel.rel_w]
        m = None
        if mask == "key":  # padding: one row for every query
            m = torch.rand(batch, 1, 1, n) > 0.3
        elif mask == "query":  # shifted windows: per query
            m = torch.rand(batch, 1, n, n) > 0.3
        assert fus.resolve_impl(q, b_fus, m) == "fused", fus.choose_path(q, b_fus, m)
        out_ref, out_fus = ref(q, k, v, bias=b_ref, key_mask=m), fus(q, k, v, bias=b_fus, key_mask=m)
        torch.testing.assert_close(out_fus, out_ref, atol=2e-4, rtol=2e-4)
        g = torch.randn_like(out_ref)
        params = [p for p in ref.operator.parameters() if p.requires_grad]
        grads_ref = torch.autograd.grad(out_ref, [q, k, v, *extra, *params], g)
        grads_fus = torch.autograd.grad(out_fus, [q, k, v, *extra, *params], g)
        for a, b in zip(grads_fus, grads_ref):
            torch.testing.assert_close(a, b, atol=5e-4, rtol=5e-4)

    check(37, 2, 5)  # ragged N, r padded
    check(20, 3, 12)
    check(37, 2, 5, base="nn.SiLU")  # the base function as one more feature
    check(36, 2, 5, bias="dense")  # Swin / mmseg bias table
    check(36, 2, 5, mask="key")  # padded windows (ViTDet), padded images (mmseg)
    check(36, 2, 5, mask="query", bias="dense")  # Swin's shifted windows
    check(35, 2, 5, relpos=(5, 7), mask="key")  # ViTDet window block
    check(35, 3, 12, relpos=(7, 5), base="nn.SiLU", mask="query")  # everything at once
    check(37, 4, 5, basis_type="SplineBasis")  # cubic B-splines on 4 intervals of [-1, 1]
    check(36, 3, 12, basis_type="SplineBasis", order=2, grid_range=(-2.0, 1.5), base="nn.SiLU", bias="dense",
          mask="query")
    check(35, 5, 5, basis_type="SplineBasis", order=1, relpos=(5, 7), mask="key")
    print("fused kernels match the reference")
""")


@pytest.mark.slow
def test_fused_kernels_match_reference_under_the_interpreter():
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", CHECK], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "match the reference" in proc.stdout


def test_fused_refuses_what_it_cannot_serve():
    import torch

    from karat import KArAtConfig, KArAtCore, kernels

    core = KArAtCore(2, 9, KArAtConfig(impl="fused", basis_type="RationalBasis"))
    q = torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match="impl='fused' cannot serve.*Fourier and B-spline"):
        core(q, q, q)
    gelu = KArAtCore(2, 9, KArAtConfig(impl="fused", base_fn="nn.GELU"))
    with pytest.raises(ValueError, match="SiLU base function, not GELU"):
        gelu(q, q, q)
    w1 = KArAtCore(2, 9, KArAtConfig(modular_mode="w1_phi2"))
    assert "linear in N" in kernels.fused_triton.supports(w1.operator, q, None, None)


def test_auto_falls_back_when_the_fused_kernels_fail(monkeypatch):
    import torch

    from karat import KArAtConfig, KArAtCore, kernels
    from karat.kernels import fused_triton as fused

    core = KArAtCore(2, 9, KArAtConfig(impl="auto"))
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    expected = core(q, k, v)
    monkeypatch.setattr(fused, "_DISABLED", None)
    monkeypatch.setattr(core, "choose_path", lambda *a: kernels.Choice("fused", "triton"))

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed to compile")

    monkeypatch.setattr(fused, "attend", broken)
    with pytest.warns(UserWarning, match="fused kernels disabled"):
        torch.testing.assert_close(core(q, k, v), expected)
    assert fused.supports(core.operator, q, None, None).startswith("the fused kernels failed earlier")


BACKWARD_FALLBACK = textwrap.dedent("""
    import warnings
    import torch
    from karat import KArAtConfig, KArAtCore
    from karat.kernels import fused_triton
    from karat.relpos import DecomposedRelPos

    torch.manual_seed(0)
    cfg = KArAtConfig(grid=2, hidden_dim=5, base_fn="nn.SiLU")
    ref = KArAtCore(2, 35, cfg.replace(impl="reference"))
    fus = KArAtCore(2, 35, cfg.replace(impl="fused"), operator_factory=lambda *_: ref.operator)
    q, k, v = (torch.randn(2, 2, 35, 16, requires_grad=True) for _ in range(3))
    rel = DecomposedRelPos(*((torch.randn(2, 2, 35, kk) * 0.5).requires_grad_() for kk in (5, 7)))
    mask = torch.rand(2, 1, 1, 35) > 0.3
    assert fus.choose_path(q, rel, mask).path == "fused"

    def broken(ctx, dh):
        raise RuntimeError("backward kernel failed to compile")

    fused_triton._FusedPhi._kernels_backward = staticmethod(broken)
    out = fus(q, k, v, bias=rel, key_mask=mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = torch.autograd.grad(out.square().sum(), [q, k, rel.rel_h, rel.rel_w, *ref.operator.parameters()])
    assert any("fused kernels disabled" in str(w.message) for w in caught)
    expected = torch.autograd.grad(ref(q, k, v, bias=rel.dense(), key_mask=mask).square().sum(),
                                   [q, k, rel.rel_h, rel.rel_w, *ref.operator.parameters()])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=5e-4, rtol=5e-4)
    assert "failed earlier" in fused_triton.supports(fus.operator, q, rel, mask)  # auto stays off them from now on
    print("backward fell back")
""")


@pytest.mark.slow
def test_a_backward_kernel_that_fails_falls_back_with_the_same_gradients():
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", BACKWARD_FALLBACK], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "backward fell back" in proc.stdout
