#!/usr/bin/env python
"""Parameters and GFLOPs (fvcore multiply-adds, the paper's convention for the KArAt operator) per model.

  python tools/flops.py --model vit_tiny_patch16_224 vit_tiny_patch16_224_karat --num-classes 10
  python tools/flops.py --model vit_base_patch16_224_karat --num-classes 10 --karat grid=1 universal=true
  python tools/flops.py --detectron2-config configs/shapes/mask_rcnn_vitdet_karat_t_shapes.py \
      --mmseg-config mmseg_configs/upernet/upernet_vit-t2-karat_1xb8-60iter_embedded-16x16.py   # their backbones

A host backbone is counted at its config's image size (ViTDet ``img_size``, mmseg ``crop_size``) unless
``--input-size`` is given; detectron2's ``tools/analyze_model.py`` and mmseg's ``get_flops.py`` count it the same.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Optional, Tuple

import timm
import torch

import karat  # noqa: F401
from karat import karat_parameter_names
from karat.flops import count_flops


def detectron2_backbone(path: str, size: Optional[int]) -> Tuple[torch.nn.Module, int]:
    """The backbone of a detectron2 lazy config and its image size."""
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(path)
    return instantiate(cfg.model.backbone), size or int(cfg.model.backbone.net.img_size)


def mmseg_backbone(path: str, size: Optional[int]) -> Tuple[torch.nn.Module, int]:
    """The backbone of an mmseg config (built in mmseg's registry scope) and its image size."""
    from mmengine import Config
    from mmengine.registry import DefaultScope

    cfg = Config.fromfile(path)
    from mmseg.registry import MODELS

    crop = cfg.get("crop_size") or cfg.model.backbone.get("img_size", 512)
    crop = crop if isinstance(crop, int) else crop[0]
    # the config's scope for this build only: whatever scope was current before stays current for the caller
    with DefaultScope.overwrite_default_scope(cfg.get("default_scope", "mmseg")):
        return MODELS.build(cfg.model.backbone), size or int(crop)


def parse_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=[], help="timm model names")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--input-size", type=int, default=None, help="default: 224 (timm), the config's size (hosts)")
    p.add_argument("--detectron2-config", nargs="*", default=[], metavar="FILE", help="detectron2 lazy configs")
    p.add_argument("--mmseg-config", nargs="*", default=[], metavar="FILE", help="mmseg configs")
    p.add_argument("--karat", nargs="*", default=[], metavar="KEY=VALUE", help="KArAt options for *_karat models")
    args = p.parse_args(argv)
    if not (args.model or args.detectron2_config or args.mmseg_config):
        p.error("give --model, --detectron2-config or --mmseg-config")
    options = dict(kv.split("=", 1) for kv in args.karat)
    options = {k: parse_value(v) for k, v in options.items()}
    print("| model | params (M) | KArAt params (M) | GFLOPs | KArAt operator GFLOPs |")
    print("|---|---|---|---|---|")
    for name in args.model:
        size = args.input_size or 224
        kwargs = dict(num_classes=args.num_classes, img_size=size)
        if name in set(timm.list_models("*_karat")):
            kwargs.update(options)
        _row(name, timm.create_model(name, **kwargs), size)
    for path in args.detectron2_config:
        _row(f"{Path(path).stem} (backbone)", *detectron2_backbone(path, args.input_size))
    for path in args.mmseg_config:
        _row(f"{Path(path).stem} (backbone)", *mmseg_backbone(path, args.input_size))
    return 0


def _row(name: str, model: torch.nn.Module, size: int) -> None:
    params = sum(p.numel() for p in model.parameters())
    names = karat_parameter_names(model)
    karat_params = sum(p.numel() for n, p in model.named_parameters() if n in names)
    flops = count_flops(model, torch.randn(1, 3, size, size))
    print(f"| {name} | {params / 1e6:.2f} | {karat_params / 1e6:.2f} | {flops['total']:.3f} | {flops['karat']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
