#!/usr/bin/env python
"""Convert a ViT classifier into an mmseg / mmdet backbone checkpoint (KArAt or softmax).

    python tools/convert_to_mmseg.py outputs/digits/classification/karat/checkpoint.pth \
        pretrain/vit-t2.pth --img-size 16
    python tools/convert_to_mmseg.py timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k pretrain/vit-t16.pth

Sources: a checkpoint of classification.main / the demo, a plain timm ViT state dict, or timm:<name>. KArAt
operator weights are resampled to the segmentation token count (spec section 6), a 1-channel patch embedding
is adapted to --in-channels, and a report says what was loaded, resampled and newly initialised. Use the
output as ``model.backbone.init_cfg=dict(type='Pretrained', checkpoint=OUT)`` or as ``load_from=OUT``.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="classification checkpoint, timm ViT state dict, or timm:<model name>")
    p.add_argument("output", help="backbone checkpoint to write (refused if it exists, unless --overwrite)")
    p.add_argument("--img-size", type=int, nargs="+", default=[512], help="segmentation crop size (H [W])")
    cls = p.add_mutually_exclusive_group()
    cls.add_argument("--cls-token", dest="cls_token", action="store_true", default=None,
                     help="keep a class token (default: as the source)")
    cls.add_argument("--no-cls-token", dest="cls_token", action="store_false")
    p.add_argument("--in-channels", type=int, default=3, help="input channels of the segmentation model")
    p.add_argument("--num-heads", type=int, default=None, help="heads of a plain state dict (default: dim / 64)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    from mmseg_configs.export import convert_classifier

    try:
        report = convert_classifier(args.source, args.output, img_size=args.img_size, with_cls_token=args.cls_token,
                                    in_channels=args.in_channels, overwrite=args.overwrite, num_heads=args.num_heads)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}\n{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
