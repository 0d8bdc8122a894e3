"""Run under ``torchrun --nproc_per_node=2`` (gloo, CPU) by ``tests/test_ddp.py`` and ``tests/test_resume.py``.

* ``classification``: DDP training steps with ``find_unused_parameters=False`` for every KArAt configuration of the
  issue, at two sizes: the small one, where ``impl="auto"`` materialises sigma(S), and the one users run (more than
  ``karat.kernels.REFERENCE_MAX_TOKENS`` keys), where ``auto`` takes the C++ CPU kernel.
* ``detectron2``, ``mmseg``: the backbones in their hosts' DDP wrappers, at both sizes too, with padded inputs.
* ``runs=FILE``: ``classification.main`` for each ``{"name": ..., "argv": [...]}`` of a JSON list, in order (the
  two-rank resume test: uninterrupted, interrupted and resumed runs in one launch).

DDP raises at an iteration's forward if a parameter that requires grad got no gradient in the previous one, so each
case runs at least two iterations; the backbones also check every gradient directly. Rank 0 prints one line per
case, ``DDP-OK <case> | cpu_kernel <forward calls> <backward calls>``, so the test can tell which path ran.

    torchrun --nproc_per_node=2 tests/ddp_driver.py [classification] [detectron2] [mmseg] [runs=FILE]
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Tuple

import torch
import torch.distributed as dist

from karat.distributed import end_process_group, init_method as karat_init_method
from kernel_calls import cpu_kernel_calls

COMMON = ["--data-set", "DIGITS", "--input-size", "8", "--batch-size", "4", "--epochs", "1", "--train-subset", "16",
          "--num_workers", "0", "--device", "cpu", "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0",
          "--reprob", "0", "--aa", "", "--drop-path", "0", "--grid", "2", "--hidden_dim", "4", "--amp", "false"]


def vit(patch: int) -> List[str]:
    """The 8 x 8 digits in patches of 2 (16 patches and the class token: 17 keys, sigma(S) materialised) or of 1
    (65 keys: the C++ kernel)."""
    return ["--model", "vit_tiny_patch16_224_karat", "--model-kwargs", f"patch_size={patch}", "in_chans=1",
            "embed_dim=16", "depth=2", "num_heads=2"]


def configurations(patch: int, window: int) -> Dict[str, List[str]]:
    return {
        "blockwise": vit(patch) + ["--blockwise"],
        "universal": vit(patch) + ["--universal"],
        "mixed_head": vit(patch) + ["--mixed_head", "--num_attention", "1"],
        "base_fn_silu": vit(patch) + ["--base_fn", "nn.SiLU"],
        "w1_phi2": vit(patch) + ["--modular_mode", "w1_phi2"],
        "basis_not_trainable": vit(patch) + ["--basis_not_trainable"],
        # the second block's windows are shifted (masks); windows of 5 pad the 8 x 8 map to 10 x 10
        "swin": ["--model", "swin_tiny_patch4_window7_224_karat", "--model-kwargs", f"patch_size={patch}",
                 "in_chans=1", f"window_size={window}", "embed_dim=8", "depths=(2,)", "num_heads=(2,)"],
        "convit": ["--model", "convit_tiny_karat", "--model-kwargs", f"patch_size={patch}", "in_chans=1",
                   "embed_dim=8", "depth=2", "num_heads=2", "local_up_to_layer=1"],
    }


KERNEL_SUFFIX = "/kernel"
CASES: Dict[str, List[str]] = {
    **configurations(patch=2, window=2),  # 17 keys (swin: 4, convit: 16 and 17)
    # 65 keys (swin: windows of 25, convit: 64 and 65)
    **{name + KERNEL_SUFFIX: args for name, args in configurations(patch=1, window=5).items()},
}
# At the larger size these still do not run the C++ kernel: it serves the Fourier phi1_w2 key reduction without a
# base function only; ``auto`` gives them the PyTorch blockwise path.
WITHOUT_CPU_KERNEL = {"base_fn_silu" + KERNEL_SUFFIX, "w1_phi2" + KERNEL_SUFFIX}


def say(msg: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, flush=True)


def report(case: str, calls: Counter) -> None:
    say(f"DDP-OK {case} | cpu_kernel {calls['forward']} {calls['backward']}")


def parse_reports(stdout: str) -> Dict[str, Tuple[int, int]]:
    """``{case: (forward calls, backward calls)}`` of the C++ kernel, from the driver's output."""
    done = {}
    for line in stdout.splitlines():
        if line.startswith("DDP-OK "):
            case, _, counts = line.removeprefix("DDP-OK ").partition(" | cpu_kernel ")
            forward, backward = counts.split()
            done[case] = (int(forward), int(backward))
    return done


def run_main(runs: Iterable[Tuple[str, List[str]]]) -> None:
    """``classification.main`` once per ``(name, argv)``, each initialising and destroying its own process group."""
    from classification.args import get_args_parser
    from classification.main import main

    # Each main() starts and ends its own process group in these processes; karat-env:// gives every start a fresh
    # namespace in torchrun's store, as it does for a group that torchrun restarts.
    for name, argv in runs:
        with cpu_kernel_calls() as calls:
            main(get_args_parser().parse_args(argv))
        report(name, calls)


def check_backbone(name: str, model: torch.nn.Module, wrap: Callable[[torch.nn.Module], torch.nn.Module],
                   x: torch.Tensor) -> None:
    """Two training steps through the host's DDP wrapper; after each backward every trainable parameter has a grad."""
    ddp = wrap(model)
    with cpu_kernel_calls() as calls:
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            out = ddp(x)
            outs = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else [out]
            sum(o.float().square().mean() for o in outs).backward()
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, f"{name}: no gradient for {missing[:5]}"
    report(name, calls)


def detectron2_backbone() -> None:
    from detectron2.engine import create_ddp_model

    from detectron2_plugin.backbone import KArAtViT

    def wrap(m):
        return create_ddp_model(m, device_ids=None, broadcast_buffers=False, find_unused_parameters=False)

    # windows of 4 x 4 (16 keys), global block of 8 x 8 (64); then windows of 5 x 5 (25 keys, the 8 x 8 map padded
    # to 10 x 10: padded keys masked) with the global block: every attention on the C++ kernel
    for window, suffix in ((4, ""), (5, KERNEL_SUFFIX)):
        torch.manual_seed(0)
        net = KArAtViT(img_size=32, patch_size=4, embed_dim=24, depth=2, num_heads=2, window_size=window,
                       window_block_indexes=[0], use_rel_pos=True, pretrain_img_size=32, pretrain_use_cls_token=False,
                       karat=dict(grid=2, hidden_dim=4))
        check_backbone("detectron2 KArAtViT" + suffix, net, wrap, torch.randn(2, 3, 32, 32))


def mmseg_backbone() -> None:
    from mmengine.model import MMDistributedDataParallel
    from mmengine.registry import DefaultScope
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    from mmseg_configs.backbones import KArAtVisionTransformer

    def wrap(m):
        return MMDistributedDataParallel(module=m, find_unused_parameters=False)

    # 4 x 4 patches and the class token (17 keys); then 6 x 6 and the class token (37 keys) with a 40 x 40 input:
    # 5 x 5 valid patches, the padded keys masked
    for size, image, suffix in ((32, 32, ""), (48, 40, KERNEL_SUFFIX)):
        torch.manual_seed(0)
        with DefaultScope.overwrite_default_scope("mmseg"):
            net = KArAtVisionTransformer(img_size=(size, size), patch_size=8, embed_dims=24, num_layers=2, num_heads=2,
                                         out_indices=(0, 1), final_norm=True, basis_type="FourierBasis", grid=2,
                                         hidden_dim=4)
        check_backbone("mmseg KArAtVisionTransformer" + suffix, net, wrap, torch.randn(2, 3, image, image))


if __name__ == "__main__":
    # a rank that hangs shows where: torchrun ends the group with SIGTERM once another rank failed
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    torch.set_num_threads(1)
    parts = sys.argv[1:] or ["classification"]
    if "classification" in parts:
        run_main((f"classification {name}", COMMON + args) for name, args in CASES.items())
    for part in parts:
        if part.startswith("runs="):
            run_main((r["name"], r["argv"]) for r in json.loads(Path(part.removeprefix("runs=")).read_text()))
    backbones = [p for p in parts if p in ("detectron2", "mmseg")]
    if backbones:
        dist.init_process_group("gloo", init_method=karat_init_method())
        for part in backbones:
            {"detectron2": detectron2_backbone, "mmseg": mmseg_backbone}[part]()
        # every rank's gloo work done before either tears the group down, as classification.main does
        # (karat.distributed.end_process_group says why)
        end_process_group()
