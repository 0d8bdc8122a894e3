"""``python -m detectron2_plugin.data --output datasets/karat_shapes``: write the synthetic shapes set."""
from __future__ import annotations

import argparse
from pathlib import Path

from .shapes import ShapesSpec, generate_shapes


def main(argv: list[str] | None = None) -> None:
    d = ShapesSpec()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output", required=True, help="dataset root (annotations/, train/, val/ are written there)")
    p.add_argument("--num-train", type=int, default=d.num_train)
    p.add_argument("--num-val", type=int, default=d.num_val)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --output")
    a = p.parse_args(argv)
    spec = ShapesSpec(num_train=a.num_train, num_val=a.num_val, image_size=a.image_size, seed=a.seed)
    try:
        root = generate_shapes(Path(a.output), spec, overwrite=a.overwrite)
    except FileExistsError as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {spec.num_train} train and {spec.num_val} val images to {root}")


if __name__ == "__main__":
    main()
