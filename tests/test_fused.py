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
    from karat.kernels import fused_triton as fused

    torch.manual_seed(0)
    for n, grid, r in [(37, 2, 5), (20, 3, 12)]:
        cfg = KArAtConfig(grid=grid, hidden_dim=r)
        ref = KArAtCore(2, n, cfg.replace(impl="reference"))
        fus = KArAtCore(2, n, cfg.replace(impl="fused"), operator_factory=lambda *_: ref.operator)
        q, k, v = (torch.randn(2, 2, n, 16, requires_grad=True) for _ in range(3))
        assert fus.resolve_impl(q) == "fused", fus.resolve_impl(q)
        out_ref, out_fus = ref(q, k, v), fus(q, k, v)
        torch.testing.assert_close(out_fus, out_ref, atol=2e-4, rtol=2e-4)
        g = torch.randn_like(out_ref)
        params = [p for p in ref.operator.parameters() if p.requires_grad]
        grads_ref = torch.autograd.grad(out_ref, [q, k, v, *params], g)
        grads_fus = torch.autograd.grad(out_fus, [q, k, v, *params], g)
        for a, b in zip(grads_fus, grads_ref):
            torch.testing.assert_close(a, b, atol=5e-4, rtol=5e-4)
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

    from karat import KArAtConfig, KArAtCore

    core = KArAtCore(2, 9, KArAtConfig(impl="fused", basis_type="SplineBasis"))
    q = torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match="impl='fused' cannot serve.*Fourier"):
        core(q, q, q)


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
