"""The whole-window Triton kernels (``karat.kernels.fused_window``): values and every gradient against the reference
path through Triton's interpreter on the CPU, a whole timm Swin, and the dispatch that sends CUDA windows of at most
64 keys to them with ``impl="auto"``.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the kernel checks run in a fresh process.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fake_gpu
from conftest import require_triton

ROOT = Path(__file__).resolve().parents[1]

# (name, batch x windows, heads, N, head_dim, G, r, config, bias, mask, dtype, windows per program or 0 for the
# default): Swin's 7 x 7 window with its bias table and shifted-window mask (several windows per program, the last
# program short), the largest window (64) with B-splines and the SiLU base, a small odd window with key padding and
# strided q, k, v (timm's fused qkv), a bias per window, and half precision.
CASES = [
    ("swin-49", 7, 2, 49, 16, 2, 5, {}, "table", "query", "float32", 3),
    ("swin-49-bf16", 4, 2, 49, 32, 3, 12, {}, "table", "query", "bfloat16", 0),
    ("n64-bspline-base", 3, 2, 64, 16, 3, 5, dict(basis_type="SplineBasis", order=2, grid_range=(-2.0, 1.5),
                                                   base_fn="nn.SiLU"), "table", "query", "float32", 2),
    ("n64-bspline-bf16", 2, 2, 64, 16, 4, 5, dict(basis_type="SplineBasis"), None, "key", "bfloat16", 0),
    ("n9-qkv-base", 3, 2, 9, 16, 3, 12, dict(base_fn="nn.SiLU"), None, "key", "float32", 2),
    ("n25-bias-per-window-fp16", 3, 2, 25, 16, 2, 5, {}, "per-window", None, "float16", 2),
]
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}

KERNEL_CHECK = textwrap.dedent("""
    import copy, json, sys, time
    import torch
    from karat import KArAtConfig, KArAtCore
    from karat.kernels import fused_window

    def check(name, batch, heads, n, d, grid, r, extra, bias_kind, mask_kind, dtype, wpp):
        torch.manual_seed(0)
        dtype = getattr(torch, dtype)
        cfg = KArAtConfig(grid=grid, hidden_dim=r, **extra)
        ref = KArAtCore(heads, n, cfg.replace(impl="reference"))
        fus = KArAtCore(heads, n, cfg.replace(impl="fused"), operator_factory=lambda *_: ref.operator)
        with torch.no_grad():  # trained-looking coefficients, not the small initial ones
            for p in ref.operator.parameters():
                p.mul_(4.0)
        bias = None
        if bias_kind == "table":  # Swin's: one (1, H, N, N) table for every window, with its gradient
            bias = (torch.randn(1, heads, n, n) * 0.5).requires_grad_()
        elif bias_kind == "per-window":
            bias = (torch.randn(batch, 1, n, n) * 0.5).requires_grad_()
        mask = None
        if mask_kind == "query":  # shifted windows: (B, 1, N, N), every query keeps itself
            mask = (torch.rand(batch, 1, n, n) > 0.3) | torch.eye(n, dtype=torch.bool)
        elif mask_kind == "key":
            mask = torch.rand(batch, 1, 1, n) > 0.2
        if "qkv" in name:  # timm's fused qkv: q, k, v are strided views
            qkv = torch.randn(batch, n, 3, heads, d).to(dtype).permute(2, 0, 3, 1, 4)
            q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
            assert not q.is_contiguous()
        else:
            q, k, v = (torch.randn(batch, heads, n, d).to(dtype).requires_grad_() for _ in range(3))
        choice = fus.choose_path(q, bias, mask)
        assert choice.detail == fused_window.DETAIL or name == "fallback", choice
        if wpp:
            fused_window.TARGET_PROGRAMS = batch * heads // wpp
            assert fused_window.windows_per_program(batch * heads) == wpp
        out = fus(q, k, v, bias=bias, key_mask=mask)
        fused_window.TARGET_PROGRAMS = 1024
        params = [p for p in ref.operator.parameters() if p.requires_grad]
        leaves = [q, k, v] + ([bias] if bias is not None else []) + params
        g = torch.randn(out.shape)
        grads = torch.autograd.grad(out, leaves, g.to(out.dtype))
        # the reference in float64 from the same (rounded) inputs: only the computation is judged
        ref64 = copy.deepcopy(ref).double()
        leaves64 = [t.detach().double().requires_grad_() for t in leaves[:len(leaves) - len(params)]]
        params64 = [p for p in ref64.operator.parameters() if p.requires_grad]
        out64 = ref64(*leaves64[:3], bias=leaves64[3] if bias is not None else None, key_mask=mask)
        grads64 = torch.autograd.grad(out64, leaves64 + params64, g.double())
        names = ["out", "dq", "dk", "dv"] + (["dbias"] if bias is not None else []) + [
            nm for nm, p in ref.operator.named_parameters() if p.requires_grad]
        errors = {nm: ((a.double() - b).abs().max() / b.abs().max()).item()
                  for nm, a, b in zip(names, (out, *grads), (out64, *grads64))}
        assert out.dtype == dtype and all(t.dtype == dtype for t in grads[:3])
        return errors

    start = time.time()
    report = {case[0]: check(*case) for case in json.loads(sys.argv[1])}

    def broken(*args):
        raise RuntimeError("backward kernel failed to compile")

    fused_window._backward = broken  # the backward falls back to autograd through the reference path
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = check("fallback", 2, 2, 49, 16, 2, 5, dict(base_fn="nn.SiLU"), "table", "query", "float32", 0)
    assert any("whole-window kernels disabled" in str(w.message) for w in caught)
    assert fused_window._DISABLED is not None
    print(json.dumps(dict(errors=report, fallback=fallback, seconds=time.time() - start)))
""")


@pytest.mark.slow
def test_window_kernels_match_float64_reference_under_the_interpreter():
    """Output and every gradient (q, k, v, the bias, the coefficients, their scalers, the base and rank weights) of
    the whole-window kernels, run by Triton's interpreter, against the reference path in float64."""
    require_triton()
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHECK, json.dumps(CASES)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(report["errors"]) == sorted(c[0] for c in CASES)
    assert max(report["fallback"].values()) <= TOLERANCE["float32"], report["fallback"]  # a failed backward kernel
    for name, *_, dtype, _wpp in CASES:
        errors = report["errors"][name]
        assert {"out", "dq", "dk", "dv", "weight", "phi.basis.coefficients", "phi.basis_scale"} <= set(errors), name
        bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[dtype]}
        assert not bad, f"{name}: relative error over {TOLERANCE[dtype]:g}: {bad}"


SWIN = textwrap.dedent("""
    import json
    import timm, torch
    import karat  # noqa: F401
    from karat import KArAtCore
    from karat.kernels import fused_window

    kw = dict(img_size=28, patch_size=2, window_size=7, embed_dim=32, depths=(2,), num_heads=(2,), num_classes=3,
              grid=2, hidden_dim=5, drop_path_rate=0.0)
    torch.manual_seed(0)
    fus = timm.create_model("swin_tiny_patch4_window7_224_karat", impl="fused", **kw)
    ref = timm.create_model("swin_tiny_patch4_window7_224_karat", impl="reference", **kw)
    ref.load_state_dict(fus.state_dict())
    paths = []
    real = fused_window.attend
    saved_other = []  # what the window node saves beyond its inputs (softmax's memory: nothing)
    def spy(op, q, k, v, bias=None, key_mask=None, scale=1.0):
        paths.append([list(q.shape), bias is not None, key_mask is not None and key_mask.shape[-2] > 1])
        inputs = {t.data_ptr() for t in (q, k, v, bias, key_mask, *op.parameters()) if t is not None}
        def pack(t):
            if t.data_ptr() not in inputs:
                saved_other.append(list(t.shape))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return real(op, q, k, v, bias, key_mask, scale)
    fused_window.attend = spy
    x = torch.randn(1, 3, 28, 28)
    losses, grads = [], []
    for model in (fus, ref):
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    err = max(((grads[0][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in grads[1].items())
    print(json.dumps(dict(losses=losses, paths=paths, same_params=sorted(grads[0]) == sorted(grads[1]),
                          grad_error=err, saved_other=saved_other)))
""")


@pytest.mark.slow
def test_swin_with_fused_window_kernels_matches_reference():
    """A timm KArAt Swin (7 x 7 windows, one plain and one shifted block, relative-position bias tables) with
    ``impl="fused"`` runs every window attention on the whole-window kernels, and its loss and every parameter
    gradient (the bias tables' included) equal the reference path's. The kernels' autograd node saves its inputs
    and nothing else (softmax attention's memory: no N x N or N x r tensor is kept for backward)."""
    require_triton()
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SWIN], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["paths"] == [[[4, 2, 49, 16], True, False], [[4, 2, 49, 16], True, True]], report["paths"]
    assert abs(report["losses"][0] - report["losses"][1]) <= 1e-5 * abs(report["losses"][1]) + 1e-7, report
    assert report["same_params"] and report["grad_error"] < 1e-4, report
    assert report["saved_other"] == [], report["saved_other"]  # saved for backward: the node's inputs only


def test_auto_falls_back_when_the_window_kernels_fail(monkeypatch):
    """A whole-window kernel that fails (e.g. a GPU with too little shared memory per block) costs that call the
    efficient path, with a warning, and turns off the whole-window kernels only: the flash ones stay on."""
    import torch

    from karat import KArAtConfig, KArAtCore, kernels
    from karat.kernels import fused_triton, fused_window

    core = KArAtCore(2, 9, KArAtConfig(impl="auto", base_fn="nn.SiLU"))  # efficient: PyTorch (no C++ kernel build)
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    expected = core(q, k, v)
    monkeypatch.setattr(fused_window, "_DISABLED", None)
    monkeypatch.setattr(fused_triton, "_DISABLED", None)
    monkeypatch.setattr(core, "choose_path", lambda *a: kernels.Choice("fused", fused_window.DETAIL))

    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(fused_window, "attend", broken)
    with pytest.warns(UserWarning, match="whole-window kernels disabled"):
        torch.testing.assert_close(core(q, k, v), expected)
    assert "shared memory" in fused_window._DISABLED and fused_triton._DISABLED is None


def test_auto_takes_the_window_kernels_for_small_cuda_windows():
    """With fake CUDA tensors (nothing runs): ``impl="auto"`` sends windows of at most 64 keys, with Swin's bias
    table and shifted-window mask, to the whole-window kernels (softmax's memory) instead of materialising
    sigma(S); 65 keys, a decomposed bias and head_dim 256 go to the flash-style kernels."""
    require_triton()
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from karat import KArAtConfig, KArAtCore, kernels
    from karat.kernels import fused_window
    from karat.relpos import DecomposedRelPos

    cfg = KArAtConfig()  # impl="auto"
    assert cfg.impl == "auto"
    cores = {n: KArAtCore(3, n, cfg) for n in (9, 49, 64, 65)}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for n, core in cores.items():
            q = torch.empty(8, 3, n, 32, device="cuda")
            bias = torch.empty(1, 3, n, n, device="cuda")
            mask = torch.empty(8, 1, n, n, dtype=torch.bool, device="cuda")
            choice = core.choose_path(q, bias, mask)
            expected = kernels.Choice("fused", fused_window.DETAIL if n <= 64 else "triton")
            assert choice == expected, (n, choice)
        q = torch.empty(8, 3, 49, 32, device="cuda")
        rel = DecomposedRelPos(torch.empty(8, 3, 49, 7, device="cuda"), torch.empty(8, 3, 49, 7, device="cuda"))
        assert cores[49].choose_path(q, rel).detail == "triton"
        wide = torch.empty(8, 3, 49, 256, device="cuda")
        assert cores[49].choose_path(wide).detail == "triton"
        assert "head_dim 256 > 128" in fused_window.supports(cores[49].operator, wide, None, None)
    assert kernels.REFERENCE_MAX_TOKENS[fused_window.DETAIL] == 0 and kernels.REFERENCE_MAX_TOKENS["triton"] == 0


# As tests/test_compile_fresh.py does for the flash kernels: a Swin traced with fake CUDA tensors (tests/fake_gpu.py,
# nothing runs), so Dynamo sees the whole-window path with the default impl, and Inductor's forward graph holds the
# window kernel itself.
FAKE_CUDA_SWIN = textwrap.dedent("""
    import json
    import timm, torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._subclasses.fake_tensor import FakeTensorMode
    import karat
    from karat.kernels import fused_triton, fused_window
    from fake_gpu import graph_ops, pretend_h100

    pretend_h100()
    model = timm.create_model("swin_tiny_patch4_window7_224_karat", img_size=28, patch_size=2, window_size=7,
                              embed_dim=32, depths=(2,), num_heads=(2,), num_classes=3, grid=2, hidden_dim=5).train()
    forward = set()


    def record(gm, inputs):
        forward.update(graph_ops(gm))
        return gm


    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        x = torch.randn(2, 3, 28, 28, device="cuda")
        core = next(m for m in model.modules() if isinstance(m, karat.KArAtCore))
        path = core.choose_path(torch.empty(8, 2, 49, 16, device="cuda"),
                                torch.empty(1, 2, 49, 49, device="cuda")).describe()
        explained = torch._dynamo.explain(model)(x)
        with torch.no_grad():  # the forward graph as Inductor receives it
            torch.compile(model, backend=aot_autograd(fw_compiler=record), fullgraph=True)(x)
    kernels = {op: [k.fn.__name__ for k in torch._library.triton.get_triton_kernels_for_op(op)]
               for op in ("karat::window_attention", "karat::window_attention_backward")}
    print(json.dumps(dict(path=path, graphs=explained.graph_count, breaks=explained.graph_break_count,
                          disabled=[fused_triton._DISABLED, fused_window._DISABLED], forward=sorted(forward),
                          kernels=kernels)))
""")


@pytest.mark.slow
def test_swin_on_the_window_kernels_traces_into_one_graph():
    """torch.compile's Dynamo takes a KArAt Swin's whole-window path (default impl, fake CUDA) as one graph without
    breaks, and AOTAutograd decomposes the operator for Inductor into the window kernel's launch: no ``karat::`` op,
    no Fourier feature outside the kernel, and no input written back (which would keep a CUDA graph from capturing)."""
    require_triton()
    report = fake_gpu.run_script(FAKE_CUDA_SWIN)
    forward, kernels = report.pop("forward"), report.pop("kernels")
    assert report == dict(path="fused (triton, whole window)", graphs=1, breaks=0, disabled=[None, None]), report
    assert "_window_fwd_kernel" in forward and "_window_bwd_kernel" not in forward, forward
    assert not any(name.startswith("karat.") for name in forward), forward
    assert not {"aten.cos.default", "aten.sin.default", "aten.copy_.default"} & set(forward), forward
    # what torch's compiled-graph cache hashes for each operator: an edited kernel is not served from a stale entry
    assert kernels == {"karat::window_attention": ["_window_fwd_kernel"],
                       "karat::window_attention_backward": ["_window_bwd_kernel"]}, kernels
