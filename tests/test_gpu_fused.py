"""The fused Triton kernels (``impl="fused"``) against a float64 reference on a CUDA device: every variant
``karat.kernels.fused_triton.supports`` accepts, in float32, bfloat16 and float16 (autocast, as in training),
forward and every gradient (q, k, v, the basis coefficients and their scalers, the rank weights).

Marked ``gpu`` (left out of ``make test``); run it by hand on a CUDA machine with
``pytest -m gpu tests/test_gpu_fused.py``, or through ``python tools/gpu_suite.py --stage tests``. With
``TRITON_INTERPRET=1`` and no GPU it runs the smaller cases on the CPU through Triton's interpreter (what
``gpu_suite.py --cpu`` does in CI). ``KARAT_GPU_TEST_REPORT=path.json`` writes every measured error there.
The kernels are also compiled by Triton
for the GPU (an H100, sm_90, where there is none), which needs no device.

Error measure: ``max |fused - reference_float64| / max |reference_float64|`` per tensor, with the float64
reference computed from the same (rounded) inputs and parameters, so only the computation is judged. Tolerances:
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from conftest import require_triton
from karat import KArAtConfig, KArAtCore
from karat.kernels import fused_window
from karat.relpos import DecomposedRelPos

pytestmark = pytest.mark.gpu

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)", allow_module_level=True)
require_triton()  # absent: skipped with the reason, a failure under CI

# float32: the coefficient products run as TF32 tensor-core dots on CUDA (10-bit mantissa; q k^T itself is
# IEEE fp32); the interpreter computes in fp32 throughout. bf16 / fp16: inputs, the kernel's output Phi(S)
# and the following products are rounded to 8 / 11 bits.
TOLERANCE = {torch.float32: 5e-3 if DEVICE == "cuda" else 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
__doc__ += "".join(f"\n* {str(k)[6:]}: {v:g}" for k, v in TOLERANCE.items())
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (batch, heads, N, head_dim, grid G, rank r, extra options, host inputs): what a ViT meets (197 tokens,
# head_dim 64, G = 3 or the Base model's G = 1), ragged N (not a multiple of the 32-token blocks), r not a power
# of two (padded) and one that is, the smallest and largest head_dim, frozen basis coefficients, mixed heads (KArAt
# for the first heads, softmax for the rest), longer sequences, and what the hosts pass: ViTDet's window block
# (14 x 14 tokens, decomposed rel-pos, padded keys) and global block (32 x 32), a Swin-like window with its bias
# table and shift mask, mmseg's padded images, and the SiLU base function; q, k, v as the strided slices of a fused
# qkv projection that timm's attention passes (``qkv``), read in place by the kernels.
VARIANTS = {
    "vit-t": (2, 3, 197, 64, 3, 12, {}, {}),
    "vit-t-qkv": (2, 3, 197, 64, 3, 12, {}, dict(qkv=True)),
    "vit-b-g1": (1, 12, 197, 64, 1, 12, {}, {}),
    "ragged-d16-r5": (2, 2, 37, 16, 2, 5, {}, {}),
    "d128-r16": (1, 2, 64, 128, 2, 16, {}, {}),
    "frozen-basis": (2, 2, 50, 32, 3, 12, dict(basis_not_trainable=True), {}),
    "mixed-head": (2, 3, 65, 32, 3, 12, dict(mixed_head=True, num_attention=1), {}),
    "n1025": (1, 2, 1025, 64, 3, 12, {}, {}),
    "n4096": (1, 1, 4096, 64, 3, 12, {}, {}),
    "vitdet-window": (4, 3, 196, 64, 3, 12, {}, dict(relpos=(14, 14), mask="key")),
    "vitdet-global": (1, 3, 1024, 64, 3, 12, {}, dict(relpos=(32, 32))),
    "swin-window": (4, 3, 144, 32, 3, 12, {}, dict(bias="dense", mask="query")),
    "swin-t-windows": (1024, 3, 49, 32, 3, 12, {}, dict(bias="dense", mask="query")),  # several per program
    "silu-base-padded": (2, 3, 197, 64, 3, 12, dict(base_fn="nn.SiLU"), dict(mask="key")),
    "bspline-padded": (2, 3, 197, 64, 5, 12, dict(basis_type="SplineBasis"), dict(mask="key")),
    # small cases of every kind: the Triton interpreter runs these in CI (tests/test_fused.py), seconds each
    "g3-r12-small": (2, 2, 20, 16, 3, 12, {}, {}),
    "qkv-small": (2, 2, 20, 16, 3, 12, {}, dict(qkv=True)),
    "silu-base-small": (2, 2, 37, 16, 2, 5, dict(base_fn="nn.SiLU"), {}),
    "bias-small": (2, 2, 36, 16, 2, 5, {}, dict(bias="dense")),
    "key-mask-small": (2, 2, 36, 16, 2, 5, {}, dict(mask="key")),
    "swin-small": (2, 2, 36, 16, 2, 5, {}, dict(bias="dense", mask="query")),
    "vitdet-small": (2, 2, 35, 16, 2, 5, {}, dict(relpos=(5, 7), mask="key")),
    "small-everything": (2, 2, 35, 16, 3, 12, dict(base_fn="nn.SiLU"), dict(relpos=(7, 5), mask="query")),
    "bspline-ragged": (2, 2, 37, 16, 4, 5, dict(basis_type="SplineBasis"), {}),
    "bspline-small": (2, 2, 36, 16, 3, 12, dict(basis_type="SplineBasis", order=2, grid_range=(-2.0, 1.5),
                                               base_fn="nn.SiLU"), dict(bias="dense", mask="query")),
    "bspline-o1-vitdet": (2, 2, 35, 16, 5, 5, dict(basis_type="SplineBasis", order=1), dict(relpos=(5, 7), mask="key")),
}
# the interpreter runs these (seconds, not minutes)
TINY = {"ragged-d16-r5", "frozen-basis", "mixed-head", "g3-r12-small", "qkv-small", "silu-base-small", "bias-small",
        "key-mask-small", "swin-small", "vitdet-small", "small-everything", "bspline-ragged", "bspline-small",
        "bspline-o1-vitdet"}

_RESULTS: List[Dict] = []
_COMPILED: List[Dict] = []


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("KARAT_GPU_TEST_REPORT")
    if path:
        Path(path).write_text(json.dumps(dict(device=DEVICE, interpreted=INTERPRET,
                                              tolerance={str(k)[6:]: v for k, v in TOLERANCE.items()},
                                              cases=_RESULTS, compiled=_COMPILED), indent=1))


def _host_inputs(batch: int, heads: int, n: int, inputs: dict):
    """(bias for the fused core, the same bias dense, its leaf tensors, key mask) for a variant's host inputs."""
    bias = dense = mask = None
    leaves: List[torch.Tensor] = []
    if inputs.get("bias") == "dense":  # a bias table shared by the batch, with its gradient
        bias = dense = (torch.randn(1, heads, n, n, device=DEVICE) * 0.5).requires_grad_()
        leaves = [bias]
    if inputs.get("relpos"):
        bias = DecomposedRelPos(*((torch.randn(batch, heads, n, kk, device=DEVICE) * 0.5).requires_grad_()
                                  for kk in inputs["relpos"]))
        dense, leaves = bias.dense(), [bias.rel_h, bias.rel_w]
    if inputs.get("mask") == "key":
        mask = torch.rand(batch, 1, 1, n, device=DEVICE) > 0.2
    elif inputs.get("mask") == "query":
        mask = torch.rand(batch, 1, n, n, device=DEVICE) > 0.2
    return bias, dense, leaves, mask


def _cores(heads: int, n: int, grid: int, r: int, extra: dict):
    cfg = KArAtConfig(grid=grid, hidden_dim=r, **extra)
    ref = KArAtCore(heads, n, cfg.replace(impl="reference")).to(DEVICE)
    fus = KArAtCore(heads, n, cfg.replace(impl="fused"), operator_factory=lambda *_: ref.operator).to(DEVICE)
    ref64 = copy.deepcopy(ref).double()
    return ref, fus, ref64


def _fits_window(variant: str) -> bool:
    """Whether the whole-window kernels (karat.kernels.fused_window) serve a variant: they take every call of at
    most 64 keys with head_dim <= 128 and no decomposed bias; the flash kernels are tested there too, forced."""
    _, _, n, d, _, _, _, inputs = VARIANTS[variant]
    return n <= fused_window.MAX_TOKENS and d <= fused_window.MAX_HEAD_DIM and not inputs.get("relpos")


CASES = [(v, kernel) for v in VARIANTS if DEVICE == "cuda" or v in TINY for kernel in ("flash", "window")
         if kernel == "flash" or _fits_window(v)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("variant,kernel", CASES, ids=[f"{v}-{k}" for v, k in CASES])
def test_fused_matches_float64_reference(variant, kernel, dtype, monkeypatch):
    batch, heads, n, d, grid, r, extra, inputs = VARIANTS[variant]
    if kernel == "flash":
        monkeypatch.setattr(fused_window, "MAX_TOKENS", 0)
    torch.manual_seed(0)
    ref, fus, ref64 = _cores(heads, n, grid, r, extra)
    bias, dense, leaves, mask = _host_inputs(batch, heads, n, inputs)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    dense64 = None
    if inputs.get("relpos"):
        dense64 = DecomposedRelPos(*leaves64).dense()
    elif leaves64:
        dense64 = leaves64[0]
    with torch.no_grad():  # trained-looking coefficients, not the small initial ones
        for p, p64 in zip(ref.operator.parameters(), ref64.operator.parameters()):
            p.mul_(4.0)
            p64.copy_(p)
    if inputs.get("qkv"):  # timm's layout: (B, N, 3, H, d) projected, q, k, v are strided (B, H, N, d) views
        qkv = torch.randn(batch, n, 3, heads, d, device=DEVICE).to(dtype).permute(2, 0, 3, 1, 4)
        q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
        assert not q.is_contiguous() and q.stride(0) != heads * q.stride(1)
    else:
        q, k, v = (torch.randn(batch, heads, n, d, device=DEVICE).to(dtype).requires_grad_() for _ in range(3))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))

    choice = fus.choose_path(q[:, :fus.num_karat_heads], bias, mask)
    assert choice.path == "fused" and (choice.detail == fused_window.DETAIL) == (kernel == "window"), choice
    with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        out = fus(q, k, v, bias=bias, key_mask=mask)
    out64 = ref64(q64, k64, v64, bias=dense64, key_mask=mask)
    g = torch.randn_like(out64)
    params = [p for p in ref.operator.parameters() if p.requires_grad]
    params64 = [p for p in ref64.operator.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [q, k, v, *leaves, *params], g.to(out.dtype))
    grads64 = torch.autograd.grad(out64, [q64, k64, v64, *leaves64, *params64], g)

    bias_names = ["d_rel_h", "d_rel_w"] if inputs.get("relpos") else ["d_bias"] * len(leaves)
    names = ["out", "dq", "dk", "dv", *bias_names] + [n for n, p in ref.operator.named_parameters() if p.requires_grad]
    errors = {name: _rel_err(a, b) for name, a, b in zip(names, (out, *grads), (out64, *grads64))}
    tol = TOLERANCE[dtype]
    _RESULTS.append(dict(variant=variant, kernel=kernel, dtype=str(dtype)[6:], shape=[batch, heads, n, d], grid=grid,
                         rank=r, options=dict(extra, **inputs), tolerance=tol, errors=errors))
    assert out.dtype == (dtype if dtype != torch.float32 else torch.float32)
    if extra.get("basis_not_trainable"):
        assert not any("coefficients" in n for n in names)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    bad = {name: err for name, err in errors.items() if err > tol}
    assert not bad, f"{variant} {dtype}: relative error over {tol:g}: {bad}"


def test_universal_model_step_matches_reference():
    """A whole timm KArAt ViT whose blocks share one operator per head (universal): a training step's loss and
    every parameter gradient with the fused kernels equal the reference path's (float32)."""
    import timm

    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5, grid=2, hidden_dim=8,
              universal=True, blockwise=False)
    torch.manual_seed(0)
    fus = timm.create_model("vit_tiny_patch16_224_karat", impl="fused", **kw).to(DEVICE)
    ref = timm.create_model("vit_tiny_patch16_224_karat", impl="reference", **kw).to(DEVICE)
    ref.load_state_dict(fus.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    losses = []
    for model in (fus, ref):
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= TOLERANCE[torch.float32] * abs(losses[1]) + 1e-6
    compared = 0
    for (name, a), (_, b) in zip(fus.named_parameters(), ref.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if b.grad is not None and b.grad.abs().max() > 0:
            assert _rel_err(a.grad, b.grad) <= TOLERANCE[torch.float32] * 2, name
            compared += "karat" in name
    assert compared >= 2  # the shared operator's tensors got gradients from both blocks


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_fused_model_under_torch_compile_matches_eager(mode):
    """``torch.compile(fullgraph=True)`` of a KArAt ViT training step on the fused path, Inductor in its default mode
    and with CUDA graphs (``reduce-overhead``): one graph, no step left out of the CUDA graphs, and the loss and every
    gradient of eager mode. The fused operators (``karat.kernels.fused_ops``) are decomposed into tensor ops and
    Triton launches that Inductor compiles with the step. Under the interpreter (CPU), ``aot_eager`` calls the
    operators as they are; CUDA graphs need CUDA."""
    import timm
    from torch._dynamo.utils import counters

    if INTERPRET and mode != "default":
        pytest.skip("CUDA graphs need a CUDA device")
    # 65 tokens: the flash kernels (karat::fused_attention); windows of <= 64 keys take the whole-window kernels
    kw = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=5, grid=2, hidden_dim=8)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224_karat", impl="fused", **kw).to(DEVICE)
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if INTERPRET else "inductor",
                             **({} if INTERPRET else dict(mode=mode)))
    results = []
    for fn, steps in ((model, 1), (compiled, 3)):  # CUDA graphs: warm-up, recording, then a replay
        for _ in range(steps):
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            model.zero_grad(set_to_none=True)
            loss = fn(x).square().mean()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads))
    (eager_loss, eager), (loss, compiled_grads) = results
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert abs(loss - eager_loss) <= TOLERANCE[torch.float32] * abs(eager_loss) + 1e-6
    assert compiled_grads.keys() == eager.keys() and any("karat" in n for n in eager)
    for n, g in eager.items():
        assert _rel_err(compiled_grads[n], g) <= TOLERANCE[torch.float32] * 2, n


COMPILE = """
import json
import torch
from karat.kernels import fused_triton

major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)  # H100 by default
arch = major * 10 + minor
for d, g, r, dtype, flags in [(64, 3, 12, "fp32", {}), (128, 3, 16, "bf16", {}), (16, 1, 5, "fp16", {}),
                              (64, 3, 12, "bf16", dict(bias=True, relpos=True, mask=True, base=True)),
                              (256, 16, 16, "fp16", dict(bias=True, relpos=True, mask=True, base=True))]:
    for kernel, shared in fused_triton.compile_offline(arch, d, g, r, dtype, **flags).items():
        print(json.dumps(dict(kernel=kernel, D=d, G=g, r=r, dtype=dtype, arch=f"sm_{arch}", flags=sorted(flags),
                              shared_bytes=shared)))
"""


def test_kernels_compile_for_the_gpu():
    """Triton compiles every kernel (forward, dq, dk) for this GPU, or for an H100 (sm_90) where there is none,
    with the shared memory within the device's limit: compile errors show up without the device."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    compiled = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(compiled) == 15
    _COMPILED.extend(compiled)
