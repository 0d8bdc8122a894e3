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
    n, b, h, d = 72, 1, 2, 4  # > every REFERENCE_MAX_TOKENS: impl='auto' takes the efficient path
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


@pytest.mark.parametrize("impl", ["reference", "efficient"])
def test_mixed_heads_under_autocast(impl):
    """KArAt heads and softmax (SDPA) heads side by side come back in one dtype."""
    core = KArAtCore(3, 72, KArAtConfig(hidden_dim=3, impl=impl, mixed_head=True, num_attention=2))
    q, k, v, bias, keep = _host_inputs("bias+windows", torch.bfloat16, 1, 3, 72, 8)
    with torch.autocast("cpu", torch.bfloat16):
        out = core(q, k, v, bias=bias, key_mask=keep)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


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
    assert out.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.bfloat16 for p in half.parameters() if p.requires_grad)
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


# ---- the pipelines' AMP switches ---------------------------------------------------------------------------------

class _KArAtOutputs:
    """Records the dtype and path of every KArAtCore call (a global forward hook, removed on exit)."""

    def __enter__(self):
        self.calls = []

        def hook(module, args, output):
            if isinstance(module, KArAtCore):
                self.calls.append((output.dtype, module.resolve_impl(args[0])))

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def test_classification_main_amp_true_on_cpu_trains_under_bf16_autocast(tmp_path, caplog):
    """``classification.main --amp True --device cpu``: bf16 autocast (no GradScaler), the KArAt cores on the
    efficient path (img 144: 81 + 1 tokens). Unset, --amp stays off on a CPU (on for CUDA)."""
    from classification.args import get_args_parser
    from classification.engine import resolve_amp
    from classification.main import main
    from test_classification import FAST, make_cifar10

    assert resolve_amp(None, "cpu") is False and resolve_amp(None, "cuda") is True
    assert resolve_amp(False, "cuda") is False
    data = make_cifar10(tmp_path / "data", n_train=8, n_test=4)
    args = get_args_parser().parse_args([
        *FAST, "--data-set", "CIFAR10", "--data-path", str(data), "--epochs", "1", "--batch-size", "4",
        "--input-size", "144", "--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2", "--amp", "True"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level("INFO", logger="classification"), _KArAtOutputs() as seen:
            last = main(args)
    finally:
        torch.set_num_threads(threads)
    assert "mixed precision: torch.bfloat16 autocast on cpu" in caplog.text
    assert seen.calls and set(seen.calls) == {(torch.bfloat16, "efficient")}
    assert last["epoch"] == 0 and all(map(torch.isfinite, torch.tensor([last["train_loss"], last["test_loss"]])))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_detectron2_amp_step_on_the_karat_vitdet(tmp_path, dtype):
    """``train.amp.enabled=True``: detectron2's AMPTrainer runs its step under ``torch.cuda.amp.autocast`` and asserts
    CUDA, so it cannot run on a CPU; ``train_net`` says so before building anything. What it does on a GPU is done
    here on the CPU with the project's real shapes config and data loader: the forward and the loss under autocast
    (fp16 as AMPTrainer's default precision, and bf16), ``GradScaler``-scaled backward, optimizer step. The global
    blocks (256 tokens, rel-pos bias) take the efficient path, the windows (16 tokens, padding masks) the reference."""
    require("detectron2")
    from detectron2.config import LazyConfig, instantiate
    from detectron2.utils.events import EventStorage

    from detectron2_plugin.data import ShapesSpec, generate_shapes, register_shapes
    from detectron2_plugin.train_net import check_config
    from test_detectron2_train import CONFIG, SMALL

    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(ROOT / CONFIG)), [*SMALL, "train.amp.enabled=True"])
    with pytest.raises(ValueError, match=r"train.amp.enabled=True needs CUDA.*train.amp.enabled=False"):
        check_config(cfg, CONFIG, eval_only=False)

    names = register_shapes(generate_shapes(tmp_path, ShapesSpec(num_train=2, num_val=1)), prefix="karat_shapes_amp")
    cfg.dataloader.train.dataset.names = names["train"]
    model = instantiate(cfg.model).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    data = next(iter(instantiate(cfg.dataloader.train)))
    karat = {n: p for n, p in model.named_parameters() if ".karat." in n and p.requires_grad}
    before = {n: p.detach().clone() for n, p in karat.items()}
    scaler = torch.amp.GradScaler("cpu")  # AMPTrainer's default scaler, on the CPU
    for _ in range(4):  # GradScaler backs off from 2^16 while any (here: detectron2's box predictor) grad overflows
        optimizer.zero_grad()
        with EventStorage(0), _KArAtOutputs() as seen, torch.autocast("cpu", dtype=dtype):  # as a trainer's step
            loss_dict = model(data)
            losses = sum(loss_dict.values())
        assert torch.isfinite(losses)
        assert {(dtype, "efficient"), (dtype, "reference")} == set(seen.calls)
        scale = scaler.get_scale()
        scaler.scale(losses).backward()
        assert all(torch.isfinite(p.grad).all() for p in karat.values())  # KArAt's never overflow, even at 2^16
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() == scale:  # the step was taken
            break
    else:
        pytest.fail("GradScaler skipped every step")
    assert all(torch.isfinite(p).all() for p in karat.values())
    assert any(not torch.equal(before[n], p) for n, p in karat.items())  # the KArAt weights took the step


@pytest.mark.slow
def test_mmseg_amp_optim_wrapper_trains_on_cpu_in_bf16(tmp_path, monkeypatch, request):
    """mmseg's AMP switch, ``optim_wrapper=dict(type='AmpOptimWrapper', dtype='bfloat16')``, through mmengine's real
    Runner on the embedded KArAt UperNet config. mmengine 0.10.7 refuses to build an AmpOptimWrapper without an
    accelerator (an assert in its ``__init__``); that one check is lifted here, and the rest is the real wrapper: its
    ``optim_context`` autocasts with mmengine's ``autocast`` (on a CPU only bf16 is allowed), its GradScaler disables
    itself without CUDA (bf16 needs no loss scaling). KArAt's cores take the efficient path (impl='efficient')."""
    require("mmseg")
    from mmengine.config import Config
    from mmengine.optim.optimizer import amp_optimizer_wrapper
    from mmengine.runner import Runner

    from mmseg_configs.data import make_embedded_ade20k

    with pytest.raises(AssertionError, match="only available training on gpu"):
        amp_optimizer_wrapper.AmpOptimWrapper(optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], 0.1))
    monkeypatch.setattr(amp_optimizer_wrapper, "is_cuda_available", lambda: True)

    data_root = make_embedded_ade20k(tmp_path / "data", num_train=4, num_val=2)
    cfg = Config.fromfile(str(ROOT / "mmseg_configs/upernet/upernet_vit-t2-karat_1xb8-60iter_embedded-16x16.py"))
    cfg.merge_from_dict({
        "train_dataloader.dataset.data_root": str(data_root), "train_dataloader.batch_size": 2,
        "model.backbone.num_layers": 4, "model.backbone.embed_dims": 48, "model.backbone.num_heads": 3,
        "model.backbone.out_indices": [0, 1, 2, 3], "model.neck.in_channels": [48] * 4,
        "model.backbone.hidden_dim": 4, "model.backbone.grid": 2, "model.backbone.impl": "efficient",
        "train_cfg.max_iters": 2, "train_cfg.val_interval": 100, "default_hooks.logger.interval": 1,
        "param_scheduler": [],
    })
    cfg.optim_wrapper.update(type="AmpOptimWrapper", dtype="bfloat16")  # keeps the config's optimizer, paramwise_cfg
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None
    cfg.work_dir = str(tmp_path / "work")
    cfg.visualizer.name = f"amp_test_visualizer_{tmp_path.name}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    runner = Runner.from_cfg(cfg)
    operator = runner.model.backbone.layers[0].attn.karat.operator
    before = operator.weight.detach().clone()
    with _KArAtOutputs() as seen:
        runner.train()
    assert isinstance(runner.optim_wrapper, amp_optimizer_wrapper.AmpOptimWrapper)
    assert not runner.optim_wrapper.loss_scaler.is_enabled()  # torch.cuda.amp.GradScaler, off without CUDA
    assert runner.iter == 2 and set(seen.calls) == {(torch.bfloat16, "efficient")}
    assert torch.isfinite(operator.weight).all() and not torch.equal(before, operator.weight)
    assert torch.isfinite(torch.tensor(runner.message_hub.get_scalar("train/loss").current()))
