"""Run under ``torchrun --nproc_per_node=2`` (gloo, CPU) by ``tests/test_ddp.py``: DDP training steps with
``find_unused_parameters=False`` for every KArAt configuration of the issue, then the detectron2 and mmseg backbones
in their hosts' DDP wrappers. DDP raises at an iteration's forward if a parameter that requires grad got no gradient
in the previous one, so each case runs at least two iterations; the backbones also check every gradient directly.

    torchrun --nproc_per_node=2 tests/ddp_driver.py [classification] [detectron2] [mmseg]
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

COMMON = ["--data-set", "DIGITS", "--input-size", "8", "--batch-size", "4", "--epochs", "1", "--train-subset", "16",
          "--num_workers", "0", "--device", "cpu", "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0",
          "--reprob", "0", "--aa", "", "--drop-path", "0", "--grid", "2", "--hidden_dim", "4", "--amp", "false"]
VIT = ["--model", "vit_tiny_patch16_224_karat", "--model-kwargs", "patch_size=2", "in_chans=1", "embed_dim=16",
       "depth=2", "num_heads=2"]
CASES: Dict[str, List[str]] = {
    "blockwise": VIT + ["--blockwise"],
    "universal": VIT + ["--universal"],
    "mixed_head": VIT + ["--mixed_head", "--num_attention", "1"],
    "base_fn_silu": VIT + ["--base_fn", "nn.SiLU"],
    "w1_phi2": VIT + ["--modular_mode", "w1_phi2"],
    "basis_not_trainable": VIT + ["--basis_not_trainable"],
    "swin": ["--model", "swin_tiny_patch4_window7_224_karat", "--model-kwargs", "patch_size=2", "in_chans=1",
             "window_size=2", "embed_dim=8", "depths=(2,)", "num_heads=(2,)"],
    "convit": ["--model", "convit_tiny_karat", "--model-kwargs", "patch_size=2", "in_chans=1", "embed_dim=8",
               "depth=2", "num_heads=2", "local_up_to_layer=1"],
}


def say(msg: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, flush=True)


def classification_cases() -> None:
    from classification.args import get_args_parser
    from classification.main import main

    # main() initialises and destroys its process group; run again in the same process, gloo would read the last
    # run's peer addresses from torchrun's store. Each run gets a namespace of its own in that store.
    store, rank, world = next(dist.rendezvous("env://"))
    init = dist.init_process_group
    try:
        for name, args in CASES.items():
            dist.init_process_group = functools.partial(init, store=dist.PrefixStore(name, store), rank=rank,
                                                        world_size=world)
            main(get_args_parser().parse_args(COMMON + args))
            say(f"DDP-OK classification {name}")
    finally:
        dist.init_process_group = init


def check_backbone(name: str, model: torch.nn.Module, wrap: Callable[[torch.nn.Module], torch.nn.Module],
                   x: torch.Tensor) -> None:
    """Two training steps through the host's DDP wrapper; after each backward every trainable parameter has a grad."""
    ddp = wrap(model)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = ddp(x)
        outs = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else [out]
        sum(o.float().square().mean() for o in outs).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{name}: no gradient for {missing[:5]}"
    say(f"DDP-OK {name}")


def detectron2_backbone() -> None:
    from detectron2.engine import create_ddp_model

    from detectron2_plugin.backbone import KArAtViT

    torch.manual_seed(0)
    net = KArAtViT(img_size=32, patch_size=4, embed_dim=24, depth=2, num_heads=2, window_size=4,
                   window_block_indexes=[0], use_rel_pos=True, pretrain_img_size=32, pretrain_use_cls_token=False,
                   karat=dict(grid=2, hidden_dim=4))
    check_backbone("detectron2 KArAtViT", net, lambda m: create_ddp_model(
        m, device_ids=None, broadcast_buffers=False, find_unused_parameters=False), torch.randn(2, 3, 32, 32))


def mmseg_backbone() -> None:
    from mmengine.model import MMDistributedDataParallel
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    from mmseg_configs.backbones import KArAtVisionTransformer

    torch.manual_seed(0)
    net = KArAtVisionTransformer(img_size=(32, 32), patch_size=8, embed_dims=24, num_layers=2, num_heads=2,
                                 out_indices=(0, 1), final_norm=True, basis_type="FourierBasis", grid=2, hidden_dim=4)
    check_backbone("mmseg KArAtVisionTransformer", net, lambda m: MMDistributedDataParallel(
        module=m, find_unused_parameters=False), torch.randn(2, 3, 32, 32))


if __name__ == "__main__":
    torch.set_num_threads(1)
    parts = sys.argv[1:] or ["classification"]
    if "classification" in parts:
        classification_cases()
    backbones = [p for p in parts if p != "classification"]
    if backbones:
        dist.init_process_group("gloo")
        for part in backbones:
            {"detectron2": detectron2_backbone, "mmseg": mmseg_backbone}[part]()
        # every rank's gloo work done before either tears the group down (as classification.main does): a rank
        # that destroyed it while the other's last work was in flight once aborted at exit (SIGABRT, "terminate
        # called without an active exception") on a loaded 2-core CI machine
        dist.barrier()
        dist.destroy_process_group()
