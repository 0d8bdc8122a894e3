"""``karat-analyze`` / ``python -m tools.analyze``: the paper's analyses of a checkpoint.

    python -m tools.analyze out/karat/checkpoint.pth --compare out/softmax/checkpoint.pth --out analysis/
    python -m tools.analyze detection/karat/model_final.pth --images my_images/ --out analysis-det/

Reads a classification checkpoint (classification.main, the demo), a detectron2 ViTDet backbone or an mmseg ViT
backbone, and writes into --out: 1_functions.png (learned phi against exp, over the logits the images produce),
2_attention_maps.png and 2_attention_rollout.png, 3_spectra.png (singular values, effective rank, row entropy,
row sums), 4_weights.png, 5_loss_landscape.png (filter-normalised, 1-D and 2-D), 6_optimizer_path.png (PCA of the
checkpoint-epochNNN.pth files that classification.main --keep-every K leaves beside the checkpoint) and
analysis.json with the numbers behind every figure. Without --images, a checkpoint trained on the embedded digits
(--data-set DIGITS) is analysed on the held-out digits it was evaluated on.
"""
from __future__ import annotations

import argparse
import ast
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .images import ImageSet, load_image_folder
from .load import LoadedModel, load_model
from .run import FAMILIES, FIGURES, JSON_NAME, Settings, analyze


def parse_options(items: List[str]) -> Dict[str, Any]:
    """``key=value`` pairs, values read as Python literals when they are one (``grid=3``, ``grid_range=[-2,2]``)."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--karat takes key=value pairs (e.g. basis_type=SplineBasis grid=5), got {item!r}.")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def default_images(model: LoadedModel, limit: int) -> ImageSet:
    """The held-out digits a DIGITS checkpoint was evaluated on (the same seeded split as training)."""
    if model.dataset != "DIGITS":
        raise ValueError(f"{model.path} was not trained on the embedded digits (data set: "
                         f"{model.dataset or 'not recorded'}), so there is no default image set: give --images DIR.")
    from ..digits import load_digits_split

    val = load_digits_split(seed=model.seed)[1]
    n = min(limit, len(val))
    return ImageSet(val.images[:n].clone(), val.targets[:n].clone(), "embedded digits (held-out split)",
                    [str(i) for i in range(10)])


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="karat-analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="classification, detectron2 or mmseg checkpoint (KArAt or softmax)")
    p.add_argument("--compare", help="a second checkpoint of the same input size (usually the softmax model)")
    p.add_argument("--images", help="image folder (flat, or one subfolder per class: then labels for the loss)")
    p.add_argument("--out", required=True, help="output folder (its figures are never overwritten silently)")
    p.add_argument("--overwrite", action="store_true", help="replace the figures and JSON already in --out")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--num-images", type=int, default=Settings.num_images,
                   help="images for functions, attention and spectra")
    p.add_argument("--max-images", type=int, default=512, help="images read from --images at most")
    p.add_argument("--blocks", type=int, nargs="+", help="blocks drawn in the function and attention-map figures "
                   "(default: all; the JSON always has all)")
    p.add_argument("--image-index", type=int, default=0, help="the image shown in the attention figures")
    p.add_argument("--points", type=int, default=Settings.points, help="1-D landscape points (odd)")
    p.add_argument("--grid", type=int, default=Settings.grid, help="2-D landscape / path plane points per axis (odd)")
    p.add_argument("--span", type=float, default=Settings.span, help="landscape half-width (direction units)")
    p.add_argument("--batches", type=int, default=Settings.batches, help="held-out batches per loss evaluation")
    p.add_argument("--batch-size", type=int, default=Settings.batch_size)
    p.add_argument("--seed", type=int, default=0, help="seed of the landscape directions")
    p.add_argument("--karat", nargs="*", default=[], metavar="KEY=VALUE",
                   help="KArAt options of a backbone checkpoint that did not record them (e.g. basis_type=SplineBasis)")
    p.add_argument("--num-heads", type=int, help="attention heads of a backbone checkpoint that did not record them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> Dict[str, Any]:
    settings = Settings(families=tuple(args.families), num_images=args.num_images, image_index=args.image_index,
                        points=args.points, grid=args.grid, span=args.span, batches=args.batches,
                        batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                        blocks=tuple(args.blocks) if args.blocks else None)
    for name, value in (("--points", args.points), ("--grid", args.grid)):
        if value < 3 or value % 2 == 0:
            raise ValueError(f"{name} must be odd and >= 3 (got {value}) so that the grid's centre is the checkpoint.")
    out = Path(args.out)
    ours = [JSON_NAME] + [f.format(suffix="") for f in FIGURES.values()]
    existing = [n for n in ours if (out / n).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{out} already holds {existing[:3]}; pass --overwrite or another --out.")
    primary = load_model(args.checkpoint, parse_options(args.karat), args.num_heads)
    compare = load_model(args.compare, parse_options(args.karat), args.num_heads) if args.compare else None
    depth = len(primary.model.blocks)
    bad = [b for b in args.blocks or [] if not 0 <= b < depth]
    if bad:
        raise ValueError(f"--blocks {bad} do not exist: the model has blocks 0 to {depth - 1}.")
    if args.images:
        m = primary.model
        data = load_image_folder(args.images, tuple(m.patch_embed.img_size), m.patch_embed.proj.in_channels,
                                 primary.mean, primary.std, args.max_images)
    else:
        data = default_images(primary, args.max_images)
    if not 0 <= args.image_index < len(data.images):
        raise ValueError(f"--image-index {args.image_index} is outside the {len(data.images)} images.")
    return analyze(primary, data, out, compare, settings)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = get_parser().parse_args(argv)
    start, cpu = time.time(), time.process_time()
    try:
        result = run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    figures = [f for fs in result["figures"].values() for f in fs]
    print(f"{len(figures)} figures and {JSON_NAME} in {args.out} ({time.time() - start:.0f} s, "
          f"{time.process_time() - cpu:.0f} s of CPU)")
    for family, why in result["skipped"].items():
        print(f"skipped {family}: {why}")
    return 0
