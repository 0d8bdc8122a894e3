#!/usr/bin/env python
"""`make demo`: KArAt against softmax on embedded data (no download), on the CPU, in three stages.

1. classification: KArAt and softmax ViT-Tiny trained by ``classification.main`` on scikit-learn's digits;
2. detection: each classifier transferred into a small ViTDet Mask R-CNN, fine-tuned with detectron2's trainer on
   a generated COCO-format set and evaluated with its COCOEvaluator (box AP, mask AP);
3. segmentation: each classifier transferred into a small UperNet, fine-tuned with mmseg's runner on a generated
   ADE20K-layout set and evaluated with its IoUMetric (mIoU).

Everything goes under a new output folder (never an existing one): per stage and model the checkpoints, logs
and metrics its framework writes, plus summary.md / summary.json, learning_curves.png and attention_maps.png.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict

from classification.demo import DemoSettings, run, summary_table

# The transfer stages: name -> (what it shows, module with ``run_stage(out_dir, checkpoints, quick) -> rows`` and
# ``summary_table(rows) -> markdown``).
TRANSFER_STAGES = {
    "detection": ("ViTDet Mask R-CNN on generated COCO-format shapes (detectron2)", "detectron2_plugin.demo"),
    "segmentation": ("UperNet on generated ADE20K-layout scenes (mmsegmentation)", "mmseg_configs.demo"),
}


def new_output_dir(requested: str | None) -> Path:
    """A fresh folder: the requested one if it does not exist or is empty, else a clear refusal."""
    if requested:
        out = Path(requested)
        if out.exists() and any(out.iterdir()):
            sys.exit(f"error: output folder {out} already exists and is not empty; the demo never overwrites "
                     f"results. Pass another --output-dir or remove that folder yourself.")
    else:
        out = Path("outputs") / time.strftime("demo-%Y%m%d-%H%M%S")  # under the working folder, as installed too
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
    p.add_argument("--stages", nargs="+", choices=list(TRANSFER_STAGES), default=list(TRANSFER_STAGES),
                   help="transfer stages to run after classification (default: all)")
    p.add_argument("--no-transfer", action="store_true", help="run the classification stage only")
    p.add_argument("--quick", action="store_true",
                   help="a few iterations per transfer stage and the smallest analysis (a smoke test)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--attn-lr", type=float, default=defaults.attn_lr, help="learning rate of KArAt parameters")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first n training images")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    out = new_output_dir(args.output_dir)
    stages = [] if args.no_transfer else args.stages
    total = 1 + len(stages)
    settings = DemoSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, attn_lr=args.attn_lr,
                            seed=args.seed, train_limit=args.train_limit, analysis_quick=args.quick)
    print(f"KArAt demo -> {out}")
    print(f"Stage 1/{total}: classification on scikit-learn digits (8x8, 10 classes), ViT-Tiny, patch 2")
    start = time.time()
    results = run(out / "classification", settings)
    summary: Dict[str, Any] = dict(classification=dict(table=summary_table(results), seconds=time.time() - start))
    checkpoints = {r["name"]: out / "classification" / r["name"] / "checkpoint.pth" for r in results}
    for i, name in enumerate(stages, start=2):
        title, module = TRANSFER_STAGES[name]
        print(f"\nStage {i}/{total}: {name}: the classifiers transferred into {title}")
        start = time.time()
        stage = importlib.import_module(module)
        rows = stage.run_stage(out / name, checkpoints, quick=args.quick)
        summary[name] = dict(table=stage.summary_table(rows), rows=rows, seconds=time.time() - start)
    report = "\n\n".join(f"## {name} ({s['seconds']:.0f} s)\n\n{s['table']}" for name, s in summary.items())
    (out / "summary.md").write_text(report + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n" + report + "\n")
    print(f"learning curves: {out / 'classification' / 'learning_curves.png'}")
    print(f"attention maps:  {out / 'classification' / 'attention_maps.png'}")
    print(f"analysis:        {out / 'classification' / 'analysis'} (learned functions, attention, spectra, weights, "
          f"loss landscape, optimizer path)")
    print(f"summary:         {out / 'summary.md'}")
    print(f"TensorBoard:     tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
