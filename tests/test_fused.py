"""The fused Triton kernels on the CPU through Triton's interpreter, and how the dispatch treats them.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the kernel checks run in a fresh process.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import require_triton


@pytest.mark.slow
def test_fused_kernels_match_reference_under_the_interpreter():
    """Every small variant of tests/test_gpu_fused.py (plain, bias, masks, rel-pos, base, B-splines, in fp32, bf16
    and fp16, against float64, forward and every gradient), run by Triton's interpreter on the CPU, on the flash
    kernels and, where they serve it, the whole-window kernels: one list of variants serves the GPU and the CPU."""
    require_triton()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           str(root / "tests" / "test_gpu_fused.py"), "-k", "test_fused_matches"],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=root, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    # 14 variants x 3 dtypes on the flash kernels, the 10 of them the whole-window kernels serve on those too
    assert passed and int(passed.group(1)) >= 72 and "failed" not in proc.stdout, proc.stdout[-2000:]


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

    def broken(*args):
        raise RuntimeError("backward kernel failed to compile")

    fused_triton._phi_backward = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        why = fused_triton.supports(fus.operator, q, rel, mask)  # the first call's check, before anything runs
    assert any("fused kernels disabled" in str(w.message) for w in caught)
    assert why.startswith("the fused kernels failed to build") and "backward kernel failed" in why, why
    try:
        fus(q, k, v, bias=rel, key_mask=mask)
        raise AssertionError("impl='fused' must refuse")
    except ValueError as e:
        assert "impl='fused' cannot serve this call" in str(e) and "failed" in str(e), e
    assert "failed earlier" in fused_triton.supports(fus.operator, q, rel, mask)  # auto stays off them from now on
    print("backward checked before the first call")
""")


@pytest.mark.slow
def test_a_backward_kernel_that_fails_to_build_is_found_before_the_first_call():
    """A variant's kernels, backward too, are built and run once at a tiny size before its first call
    (``karat.kernels.fused_ops.builds``, outside any trace or CUDA-graph capture): one that fails turns the fused
    path off, so ``auto`` takes the efficient path from the start instead of falling back inside a backward."""
    require_triton()
    proc = subprocess.run([sys.executable, "-c", BACKWARD_FALLBACK], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "backward checked before the first call" in proc.stdout
