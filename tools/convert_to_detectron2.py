#!/usr/bin/env python
"""Convert a ViT classifier checkpoint into a ViTDet backbone checkpoint for a detectron2 lazy config.

    python tools/convert_to_detectron2.py SOURCE --config-file CONFIG --output OUT.pth [--overwrite] [key=value ...]

SOURCE: a checkpoint written by classification.main or the demo (<run>/checkpoint.pth), a plain timm ViT state dict
(.pth/.safetensors), or timm:<model name> (timm's pretrained weights). CONFIG: the lazy config you will train
(its model.backbone.net says the target: size, window, image size, KArAt options). key=value overrides apply to the
config as on the training command line. Then train with train.init_checkpoint=OUT.pth.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.config_paths import check_config_path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="classification checkpoint, timm ViT state dict, or timm:<model name>")
    p.add_argument("--config-file", required=True, help="the detectron2 lazy config the checkpoint is for")
    p.add_argument("--output", required=True, help="where to write the ViTDet backbone checkpoint (.pth)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("opts", nargs="*", help="config overrides, key=value")
    a = p.parse_intermixed_args(argv)
    from detectron2_plugin.convert import convert_file

    try:
        check_config_path(a.config_file, [ROOT / "configs"])
        conversion = convert_file(a.source, a.config_file, Path(a.output), a.opts, overwrite=a.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(conversion.describe())
    print(f"wrote {a.output}; train with: train.init_checkpoint={a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
