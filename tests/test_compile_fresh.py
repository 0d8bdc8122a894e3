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

import fake_gpu
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
def test_a_compiled_model_trains_at_its_native_size_then_another_without_graph_breaks():
    """``dynamic_img_size=True``: at a second input size the operators are resampled inside the compiled graph; the
    skeleton of the resampled operator is built eagerly while Dynamo traces (``karat.resample._build_skeleton``),
    not in the graph, where it broke ``fullgraph=True`` on the first call at a new size."""
    report = _fresh_process("aot_eager", "--any-size")["any_size"]
    assert set(report["steps"]) == {"64", "48"}, report
    for size, step in report["steps"].items():
        for what in ("logits", "grads", "params"):
            assert step[what] <= 1e-4, (size, what, step)
    assert (report["graphs"], report["breaks"], report["reasons"]) == (1, 0, []), report
    assert report["path"].startswith("efficient"), report  # 37 tokens: the default path, not the reference


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


# With fake CUDA tensors (tests/fake_gpu.py: nothing runs) the graphs show what Inductor would compile. AOTDispatch
# decomposes the fused operators (karat::fused_attention and its backward, torch.library.triton_op) into tensor ops and
# Triton launches (triton_kernel_wrapper_functional).
FAKE_CUDA = """
import json
import timm, torch
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode
import karat
from karat.kernels import fused_ops, fused_triton
from fake_gpu import graph_ops, pretend_h100

pretend_h100()
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224_karat", img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                          num_classes=10).train()
graphs = []


def record(gm, inputs):
    graphs.append(sorted(graph_ops(gm)))
    return gm


def fused_pair(q, k, v, coefficients, ones, bias, rel_h, rel_w, mask, spline):
    consts = (3, 0.125, -1.0, 2.0, spline)
    out, hidden, saved, coef = fused_ops.fused_attention(q, k, v, coefficients, ones, ones, ones, bias, rel_h, rel_w,
                                                         mask, *consts)
    return fused_ops.fused_attention_backward(out, q, k, v, coefficients, ones, coef, ones, hidden, saved, bias,
                                              rel_h, rel_w, mask, *consts, True, bias is not None)


with FakeTensorMode(allow_non_fake_inputs=True):
    model = model.to("cuda")
    x = torch.randn(2, 3, 64, 64, device="cuda")
    core = next(m for m in model.modules() if isinstance(m, karat.KArAtCore))
    path = core.choose_path(torch.empty(2, 2, 65, 32, device="cuda")).describe()
    explained = torch._dynamo.explain(model)(x)
    with torch.no_grad():  # the forward graph as Inductor receives it
        torch.compile(model, backend=aot_autograd(fw_compiler=record), fullgraph=True)(x)
    # the operator pair alone, with what hosts pass: bf16 slices of a fused qkv, a dense bias and a padding mask;
    # the decomposed bias, a per-query mask and B-splines of order 3
    b, h, n = 2, 2, 12
    qkv = torch.randn(b, n, 3, h, 32, device="cuda", dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
    ones = torch.ones(h, n, 12, device="cuda")
    for extras in ((torch.randn(1, h, n, n, device="cuda"), None, None, torch.rand(b, 1, 1, n, device="cuda") > 0.2,
                    0),
                   (None, torch.randn(b, h, n, 3, device="cuda"), torch.randn(b, h, n, 4, device="cuda"),
                    torch.rand(1, 1, n, n, device="cuda") > 0.2, 3)):
        torch._dynamo.reset()
        coefficients = torch.randn(h, n, 12, 6, device="cuda")
        torch.compile(fused_pair, backend=aot_autograd(fw_compiler=record), fullgraph=True)(*qkv, coefficients, ones,
                                                                                            *extras)
kernels = {op: [k.fn.__name__ for k in torch._library.triton.get_triton_kernels_for_op(op)]
           for op in ("karat::fused_attention", "karat::fused_attention_backward")}
print(json.dumps(dict(path=path, graphs=explained.graph_count, breaks=explained.graph_break_count,
                      reasons=[str(r.reason).splitlines()[0] for r in explained.break_reasons],
                      disabled=fused_triton._DISABLED, forward=graphs[0], pairs=graphs[1:], kernels=kernels)))
"""


@pytest.mark.slow
def test_fused_triton_path_traces_with_fake_cuda_tensors():
    """The default impl on (fake) CUDA: one graph, no break, and the Triton kernels themselves in the graphs that
    Inductor compiles: the forward kernel in the model's forward, all three in the operator pair's (bf16, each kind
    of bias and mask, B-splines), and no input written back, which would keep a CUDA graph from capturing the step.
    The model's backward is traced on the CPU through the interpreter instead (below): AOTAutograd's backward trace
    runs the autograd engine, which needs a CUDA context even for fake CUDA tensors (``hasPrimaryContext``).
    ``tests/test_gpu_fused.py`` compiles the whole training step on a GPU, with CUDA graphs too."""
    from conftest import require_triton

    require_triton()
    report = fake_gpu.run_script(FAKE_CUDA)
    forward, pairs, kernels = report.pop("forward"), report.pop("pairs"), report.pop("kernels")
    assert report == dict(path="fused (triton)", graphs=1, breaks=0, reasons=[], disabled=None), report
    assert forward.count("_phi_fwd_kernel") == 1 and "_phi_bwd_dq_kernel" not in forward, forward
    assert len(pairs) == 2
    for pair in pairs:
        assert {"_phi_fwd_kernel", "_phi_bwd_dq_kernel", "_phi_bwd_dk_kernel"} <= set(pair), pair
    for graph in (forward, *pairs):  # no Fourier feature outside the kernels: no efficient or reference path
        assert not {"aten.cos.default", "aten.sin.default"} & set(graph), graph
        assert not any(name.startswith("karat.") for name in graph), graph  # decomposed for Inductor
        # the kernels write only what they allocate: no input is written back (a CUDA graph would skip that)
        assert not {"aten.copy_.default", "aten.select_scatter.default"} & set(graph), graph
    # what torch's compiled-graph cache hashes for each operator: an edited kernel is not served from a stale entry
    assert kernels == {"karat::fused_attention": ["_phi_fwd_kernel"],
                       "karat::fused_attention_backward": ["_phi_bwd_dq_kernel", "_phi_bwd_dk_kernel"]}, kernels


# Under TRITON_INTERPRET=1 the fused operators are opaque custom ops (Inductor cannot compile interpreted kernels),
# so a compiled training step on CPU tensors calls the real kernels: what the compiler captures, forward and backward,
# and whether the gradients are right. impl='fused': 'auto' takes the fused kernels on CUDA tensors only. The family
# (argv[1]) sets the tokens: 65 take the flash kernels (karat::fused_attention), 17 (windows of <= 64 keys) the
# whole-window kernels (karat::window_attention).
INTERPRETED = """
import copy, json, sys
import timm, torch
from torch._dynamo.backends.common import aot_autograd
from functorch.compile import make_boxed_func
import karat
from karat.kernels import fused_ops, fused_window

family = sys.argv[1]
patch = {"flash": 4, "window": 8}[family]
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224_karat", img_size=32, patch_size=patch, embed_dim=32, depth=2,
                          num_heads=2, num_classes=10, impl="fused", hidden_dim=4, grid=2, base_fn="nn.SiLU").train()
reference = copy.deepcopy(model)
core = next(m for m in model.modules() if isinstance(m, karat.KArAtCore))
rng = torch.get_rng_state()
path = core.choose_path(torch.zeros(2, 2, core.num_tokens, 16)).describe()  # the kernels' tiny check runs here, eagerly
rng_kept = bool(torch.equal(rng, torch.get_rng_state())) and [k[0] for k in fused_ops._BUILDS] == [family]
graphs = {"forward": set(), "backward": set()}


def recorder(kind):
    def compiler(gm, inputs):
        graphs[kind] |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        return make_boxed_func(gm)
    return compiler


def step(m, x, y):
    return torch.nn.functional.cross_entropy(m(x), y)


x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
explained = torch._dynamo.explain(step)(model, x, y)
torch._dynamo.reset()
compiled = torch.compile(step, backend=aot_autograd(fw_compiler=recorder("forward"),
                                                    bw_compiler=recorder("backward")), fullgraph=True)
loss = compiled(model, x, y)
loss.backward()
ref_loss = step(reference, x, y)
ref_loss.backward()
grads = max(float((p.grad - r.grad).abs().max() / (r.grad.abs().max() + 1e-12))
            for p, r in zip(model.parameters(), reference.parameters()))

# opcheck: schema, autograd registration, fake implementations (exact output shapes, dtypes and strides), AOTDispatch
# with dynamic shapes; q, k, v are slices of a fused qkv, as in timm
b, h, n, d, r, m = 2, 2, 12, 16, 3, 4
q, k, v = (t.detach().requires_grad_() for t in torch.randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4))
params = [torch.randn(h, n, r, m), torch.rand(h, n, r), torch.randn(h, n, r), torch.randn(h, n, r)]
coefficients, basis_scale, base, weight = (t.requires_grad_() for t in params)
checks = {}


def detached(*tensors):
    return [t.detach() if t is not None else None for t in tensors]


if family == "flash":
    calls = {"dense bias, padding mask": (torch.randn(1, h, n, n, requires_grad=True), None, None,
                                          torch.rand(b, 1, 1, n) > 0.2),
             "decomposed bias, per-query mask": (None, torch.randn(b, h, n, 3, requires_grad=True),
                                                 torch.randn(b, h, n, 4, requires_grad=True),
                                                 torch.rand(1, 1, n, n) > 0.2)}
    for name, extras in calls.items():
        args = (q, k, v, coefficients, basis_scale, base, weight, *extras, 2, 0.25, 0.0, 1.0, 0)
        checks[name] = torch.library.opcheck(fused_ops.fused_attention, args)
        out, hidden, saved, coef = fused_ops.fused_attention(*args)
        back = (torch.randn_like(out), *detached(q, k, v, coefficients, basis_scale), coef, weight.detach(), hidden,
                saved, *detached(*extras), 2, 0.25, 0.0, 1.0, 0, True, extras[0] is not None)
        checks[name + ", backward"] = torch.library.opcheck(fused_ops.fused_attention_backward, back)
else:  # a bias shared by the windows (Swin's table) and one per window; padding and shifted-window masks
    calls = {"shared bias, padding mask": (torch.randn(1, h, n, n, requires_grad=True), torch.rand(b, 1, 1, n) > 0.2),
             "per-window bias, per-query mask": (torch.randn(b, h, n, n, requires_grad=True),
                                                 torch.rand(b, 1, n, n) > 0.2)}
    for name, (bias, mask) in calls.items():
        args = (q, k, v, coefficients, basis_scale, base, weight, bias, mask, 2, 0.25, 0.0, 1.0, 0, torch.float32)
        checks[name] = torch.library.opcheck(fused_window.window_attention, args)
        out = fused_window.window_attention(*args)
        back = (torch.randn_like(out), *detached(q, k, v, coefficients, basis_scale, base, weight, bias), mask,
                2, 0.25, 0.0, 1.0, 0, True)
        checks[name + ", backward"] = torch.library.opcheck(fused_window.window_attention_backward, back)
print(json.dumps(dict(graphs=explained.graph_count, breaks=explained.graph_break_count,
                      forward=sorted(graphs["forward"]), backward=sorted(graphs["backward"]),
                      loss=abs(float(loss) - float(ref_loss)), grads=grads, path=path, rng_kept=rng_kept,
                      opcheck={k: sorted(set(v.values())) for k, v in checks.items()})))
"""
FAMILIES = {"flash": ("fused (triton)", "karat.fused_attention"),
            "window": ("fused (triton, whole window)", "karat.window_attention")}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_training_step_compiles_and_its_operators_pass_opcheck_under_the_interpreter(family):
    """A compiled training step of a KArAt ViT on each fused path (Triton's interpreter on CPU tensors): one graph,
    the family's operator in the forward graph and its backward operator in the backward graph, no Fourier feature
    computed outside them (no efficient or reference path), and the eager step's loss and gradients. Then
    ``torch.library.opcheck`` on both operators, with each kind of bias and mask."""
    from conftest import require_triton

    require_triton()
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED, family], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    path, op = FAMILIES[family]
    assert (report["graphs"], report["breaks"]) == (1, 0), report
    assert report["path"] == path and report["rng_kept"], report  # the build check draws no random number
    assert f"{op}.default" in report["forward"], report["forward"]
    assert f"{op}_backward.default" in report["backward"], report["backward"]
    for graph in (report["forward"], report["backward"]):
        assert not {"aten.cos.default", "aten.sin.default", "karat.fourier_reduce.default"} & set(graph), graph
    assert report["loss"] <= 1e-5 and report["grads"] <= 1e-4, report
    assert report["opcheck"] == {name: ["SUCCESS"] for name in report["opcheck"]}, report["opcheck"]


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
