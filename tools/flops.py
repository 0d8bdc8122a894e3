#!/usr/bin/env python
"""Parameters and GFLOPs (fvcore multiply-adds, the paper's convention for the KArAt operator) per model.

  python tools/flops.py --model vit_tiny_patch16_224 vit_tiny_patch16_224_karat --num-classes 10
  python tools/flops.py --model vit_base_patch16_224_karat --num-classes 10 --karat grid=1 universal=true
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402

import karat  # noqa: E402,F401
from karat import karat_parameter_names  # noqa: E402
from karat.flops import count_flops  # noqa: E402


def parse_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--karat", nargs="*", default=[], metavar="KEY=VALUE", help="KArAt options for *_karat models")
    args = p.parse_args(argv)
    options = dict(kv.split("=", 1) for kv in args.karat)
    options = {k: parse_value(v) for k, v in options.items()}
    print("| model | params (M) | KArAt params (M) | GFLOPs | KArAt operator GFLOPs |")
    print("|---|---|---|---|---|")
    for name in args.model:
        kwargs = dict(num_classes=args.num_classes, img_size=args.input_size)
        if name in set(timm.list_models("*_karat")):
            kwargs.update(options)
        model = timm.create_model(name, **kwargs)
        params = sum(p.numel() for p in model.parameters())
        names = karat_parameter_names(model)
        karat_params = sum(p.numel() for n, p in model.named_parameters() if n in names)
        flops = count_flops(model, torch.randn(1, 3, args.input_size, args.input_size))
        print(f"| {name} | {params / 1e6:.2f} | {karat_params / 1e6:.2f} | {flops['total']:.3f} | {flops['karat']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
