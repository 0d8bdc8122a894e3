"""``torch.compile(model, fullgraph=True)`` as a new user's first call: a KArAt ViT with the default ``impl``, in a
fresh process (``tests/compile_driver.py``), so that nothing has loaded or built the fused C++ kernel before the
compiled forward needs it. A training step must compile into one graph (the kernel's availability is settled
outside the trace: ``karat.kernels.fused_cpu.available``) and match eager mode; ``torch._dynamo.explain`` must find
no graph break on any CPU path: the reference path, the C++ kernel, and the PyTorch blockwise path
(``KARAT_CPU_KERNEL=0``).

One process trains with Inductor (real code generation, about a minute on two cores; its backward graph is where a
wrong fake kernel shows), the other with ``aot_eager`` (Dynamo's graph and AOTAutograd's backward, seconds).
``tests/test_export_compile.py`` covers every model family with an explicit ``impl``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_cpu_kernel

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("compile_driver.py")


def _fresh_process(*args: str, **env: str) -> dict:
    """The driver's JSON report, from a new interpreter that has imported nothing of ours."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    proc = subprocess.run([sys.executable, str(DRIVER), *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), stderr=proc.stderr)


def _check(report: dict, path: str, tol: float) -> None:
    step = report["native"]
    assert step["path"] == path, step  # the path under test really served the compiled calls
    assert step["graphs"] == 1, step  # fullgraph, and the second step reused the first's graph
    for what in ("logits", "grads", "params"):
        assert step[what] <= tol, (what, step)
    for impl, explained in report.get("explain", {}).items():
        assert (explained["graphs"], explained["breaks"]) == (1, 0), (impl, explained)


@pytest.mark.slow
def test_first_call_compiles_a_training_step_with_inductor_on_the_cpp_kernel(tmp_path):
    require_cpu_kernel()  # built (or found in its cache) here, so the fresh process loads it: nothing is logged
    # Inductor's own cache starts empty, as on a new machine: it keys a custom op by name, not by its fake kernel,
    # so code compiled with an older karat could otherwise be reused
    report = _fresh_process("inductor", "--explain", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    _check(report, "efficient (C++ CPU kernel)", tol=1e-4)
    assert not any("building" in m for m in report["log"]), report["log"]  # issue 21: only a real build says so
    assert any(m.startswith("DEBUG: karat: loading the fused CPU kernel") for m in report["log"]), report["log"]
    assert "No CUDA runtime is found" not in report["stderr"]  # torch's import-time warning, irrelevant on a CPU


@pytest.mark.slow
def test_first_call_compiles_a_training_step_on_the_pytorch_blockwise_path():
    report = _fresh_process("aot_eager", "--explain", KARAT_CPU_KERNEL="0")
    _check(report, "efficient (PyTorch, blockwise)", tol=1e-4)
    assert report["log"] == [], report["log"]  # the disabled kernel is neither built nor loaded


def test_cached_kernel_is_recognised(tmp_path):
    from karat.kernels import fused_cpu

    assert not fused_cpu._is_cached(tmp_path)
    (tmp_path / f"{fused_cpu.LIBRARY}.so").write_bytes(b"")  # written after the source: current
    assert fused_cpu._is_cached(tmp_path)
    os.utime(tmp_path / f"{fused_cpu.LIBRARY}.so", (0, 0))  # older than the source: ninja would rebuild it
    assert not fused_cpu._is_cached(tmp_path)


# On a machine without a GPU, Dynamo does not recognise Triton kernels (torch.utils._triton.has_triton() asks the CUDA
# driver) and would trace into Triton's launcher; on a GPU machine it captures each launch as one graph node. The
# script says "a GPU is there" and traces the model with fake CUDA tensors: nothing runs, Dynamo sees the fused path.
FAKE_CUDA = """
import json
import timm, torch
import torch.utils._triton
from torch._subclasses.fake_tensor import FakeTensorMode
import karat
from karat.kernels import fused_triton

torch.utils._triton.has_triton = lambda: True
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224_karat", img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                          num_classes=10).train()
with FakeTensorMode(allow_non_fake_inputs=True):
    model = model.to("cuda")
    x = torch.randn(2, 3, 64, 64, device="cuda")
    core = next(m for m in model.modules() if isinstance(m, karat.KArAtCore))
    path = core.choose_path(torch.empty(2, 2, 65, 32, device="cuda")).describe()
    explained = torch._dynamo.explain(model)(x)
print(json.dumps(dict(path=path, graphs=explained.graph_count, breaks=explained.graph_break_count,
                      reasons=[str(r.reason).splitlines()[0] for r in explained.break_reasons],
                      disabled=fused_triton._DISABLED)))
"""


@pytest.mark.slow
def test_fused_triton_path_traces_with_fake_cuda_tensors():
    """The forward only: AOTAutograd's backward trace runs the autograd engine, which needs a CUDA context even for
    fake CUDA tensors (``hasPrimaryContext``); ``tests/test_gpu_fused.py`` compiles the model's backward on a GPU."""
    from conftest import require_triton

    require_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", FAKE_CUDA], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == dict(path="fused (triton)", graphs=1, breaks=0, reasons=[], disabled=None), report


@pytest.mark.slow
def test_cpp_kernel_ops_pass_opcheck_on_strided_qkv_slices():
    """``torch.library.opcheck``: schema, autograd registration, and fake kernels whose outputs have the real ones'
    shapes and strides (q and k are slices of a fused qkv, as in timm; a fake that copied their strides made Inductor
    fail its stride assertion in the backward)."""
    require_cpu_kernel()
    import torch

    from karat.kernels import fused_cpu

    b, h, n, d, grid, r = 2, 2, 30, 8, 3, 4
    gen = torch.Generator().manual_seed(0)
    q, k, _ = torch.randn(b, n, 3, h, d, dtype=torch.float64, generator=gen).permute(2, 0, 3, 1, 4)
    coef = torch.randn(h, n, 2 * grid, r, dtype=torch.float64, generator=gen)
    bias = torch.randn(1, h, n, n, dtype=torch.float64, generator=gen).expand(b, h, n, n)
    mask = (torch.rand(1, 1, 1, n, generator=gen) > 0.2).expand(b, h, n, n)
    dy = torch.randn(b, h, n, r, dtype=torch.float64, generator=gen)
    grad = [t.detach().requires_grad_() for t in (q, k, coef, bias)]
    for op, args in ((fused_cpu.fourier_reduce, (*grad[:3], 0.3, grid, grad[3], mask)),
                     (fused_cpu.fourier_reduce_backward, (dy, q, k, coef, 0.3, grid, bias, mask, True))):
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, result
