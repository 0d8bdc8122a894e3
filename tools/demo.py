#!/usr/bin/env python
"""`make demo`: KArAt against softmax on the embedded digits images (no download), on the CPU.

Writes everything under a new output folder (never an existing one): per model a checkpoint,
TensorBoard logs and log.txt (JSON lines), plus summary.md / summary.json, learning_curves.png and attention_maps.png.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classification.demo import DemoSettings, run  # noqa: E402


def new_output_dir(requested: str | None) -> Path:
    """A fresh folder: the requested one if it does not exist or is empty, else a clear refusal."""
    if requested:
        out = Path(requested)
        if out.exists() and any(out.iterdir()):
            sys.exit(f"error: output folder {out} already exists and is not empty; the demo never overwrites "
                     f"results. Pass another --output-dir or remove that folder yourself.")
    else:
        out = ROOT / "outputs" / time.strftime("demo-%Y%m%d-%H%M%S")
        suffix = 1
        while out.exists():
            out = out.with_name(f"{out.name.split('+')[0]}+{suffix}")
            suffix += 1
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DemoSettings()
    p.add_argument("--output-dir", help="where to write results (default: outputs/demo-<date>-<time>)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--attn-lr", type=float, default=defaults.attn_lr, help="learning rate of KArAt parameters")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first n training images")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    out = new_output_dir(args.output_dir)
    settings = DemoSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, attn_lr=args.attn_lr,
                            seed=args.seed, train_limit=args.train_limit)
    print(f"KArAt demo -> {out}")
    print("Stage 1/1: classification on scikit-learn digits (8x8, 10 classes), ViT-Tiny, patch 2")
    results = run(out, settings)
    print()
    print((out / "summary.md").read_text())
    print(f"learning curves: {out / 'learning_curves.png'}")
    print(f"attention maps:  {out / 'attention_maps.png'}")
    print(f"checkpoints:     {', '.join(str(out / r['name'] / 'checkpoint.pth') for r in results)}")
    print(f"TensorBoard:     tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
