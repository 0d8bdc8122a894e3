#!/usr/bin/env python
"""How the digits demo's two ViT-Tiny models (8 px, patch 2) fare at other input sizes.

Both are trained at 8 px as ``make demo`` trains them (``classification.main``, the demo's recipe), then evaluated
on the held-out digits resized (bilinear) to every ``--sizes`` entry with ``dynamic_img_size=True``: KArAt with its
operators resampled at run time (spec section 6), softmax with timm's interpolation of the position embedding. Each
is evaluated as trained and after ``--finetune-epochs`` of fine-tuning at that size (AdamW, constant lr, the demo's
label smoothing and shift augmentation), starting from the 8 px weights each time. The goal: KArAt keeps at least as
large a fraction of its 8 px accuracy as softmax keeps of its own.

  python -m tools.resolution_study                       # trains both, ~5 min on 2 CPU cores
  python -m tools.resolution_study --checkpoints outputs/demo-<date>-<time>/classification  # a demo's models
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import karat  # noqa: F401  registers the KArAt models
from karat import load_checkpoint
from karat.digits import IMG_SIZE, MEAN, STD, load_digits_split

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("karat", "softmax")


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """Digits ``(B, 1, 8, 8)`` at ``size`` px (bilinear; antialiased when smaller)."""
    if size == images.shape[-1]:
        return images
    down = size < images.shape[-1]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=down)


def dynamic_model(checkpoint: Path) -> nn.Module:
    """The trained classifier rebuilt with ``dynamic_img_size=True`` (timm's way to take any input size)."""
    ckpt = load_checkpoint(checkpoint)
    model = timm.create_model(ckpt["model_name"], **dict(ckpt["model_kwargs"], dynamic_img_size=True))
    model.load_state_dict(ckpt["model"])
    return model


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, size: int, batch: int = 256) -> float:
    model.eval()
    correct = sum(int((model(resized(images[i:i + batch], size)).argmax(-1) == targets[i:i + batch]).sum())
                  for i in range(0, len(targets), batch))
    return 100.0 * correct / len(targets)


def finetune(model: nn.Module, train_set, size: int, epochs: int, lr: float, batch: int, seed: int) -> None:
    """``epochs`` at ``size`` px: the demo's training set (shift augmentation at 8 px, then resized)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_set), generator=gen)
        for i in range(0, len(order), batch):
            imgs, targets = zip(*(train_set[int(j)] for j in order[i:i + batch]))
            loss = F.cross_entropy(model(resized(torch.stack(imgs), size)), torch.stack(targets), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()


def train_demo_models(out_dir: Path, epochs: int) -> Dict[str, Path]:
    """The demo's two classifiers, trained by ``classification.main`` with the demo's recipe."""
    from classification.demo import DEMO_MODELS, DemoSettings, train_model

    settings = DemoSettings(epochs=epochs, analysis=False)
    for name in MODELS:
        train_model(name, DEMO_MODELS[name], settings, out_dir)
    return {name: out_dir / name / "checkpoint.pth" for name in MODELS}


def study(checkpoints: Dict[str, Path], sizes: Sequence[int], finetune_epochs: int, lr: float, batch: int,
          seed: int) -> Dict[str, Dict[str, Dict[int, float]]]:
    """``{model: {"as_trained"|"finetuned": {size: top-1}}}`` on the held-out digits."""
    torch.manual_seed(seed)
    train_set, val_set = load_digits_split(seed=seed)
    images, targets = val_set.images, val_set.targets
    results: Dict[str, Dict[str, Dict[int, float]]] = {}
    for name in MODELS:
        results[name] = {"as_trained": {}, "finetuned": {}}
        for size in sizes:
            model = dynamic_model(checkpoints[name])
            results[name]["as_trained"][size] = top1(model, images, targets, size)
            if finetune_epochs:
                torch.manual_seed(seed)
                finetune(model, train_set, size, finetune_epochs, lr, batch, seed)
                results[name]["finetuned"][size] = top1(model, images, targets, size)
            print(f"{name} {size} px: {results[name]['as_trained'][size]:.1f}"
                  + (f", fine-tuned {results[name]['finetuned'][size]:.1f}" if finetune_epochs else ""), flush=True)
    return results


def table(results: Dict[str, Dict[str, Dict[int, float]]], sizes: Sequence[int], base: int = IMG_SIZE) -> str:
    """Markdown: top-1 per size, as trained and fine-tuned, with the fraction of the 8 px accuracy kept."""
    lines = ["| model | " + " | ".join(f"{s} px" for s in sizes) + " | "
             + " | ".join(f"{s} px, fine-tuned" for s in sizes if s != base) + " |",
             "|---|" + "---|" * (len(sizes) + len([s for s in sizes if s != base]))]
    for name in MODELS:
        r = results[name]
        ref = r["as_trained"][base]
        cells = [f"{r['as_trained'][s]:.1f}" + ("" if s == base else f" ({r['as_trained'][s] / ref:.0%})")
                 for s in sizes]
        cells += [f"{r['finetuned'][s]:.1f} ({r['finetuned'][s] / ref:.0%})" for s in sizes
                  if s != base and s in r["finetuned"]]
        lines.append(f"| {'KArAt' if name == 'karat' else 'softmax'} ViT-Tiny | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.resolution_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=Path, help="folder holding karat/checkpoint.pth and softmax/checkpoint.pth "
                                                    "(a demo's classification stage); default: train them")
    p.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "resolution_study",
                   help="where the two classifiers are trained (when --checkpoints is not given)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "resolution_study.json")
    p.add_argument("--epochs", type=int, default=12, help="training epochs at 8 px (the demo's 12)")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 12, 16])
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if IMG_SIZE not in a.sizes:
        p.error(f"--sizes must include the training size {IMG_SIZE} (the accuracy the others are compared to)")
    if any(s % 2 for s in a.sizes):
        p.error("--sizes must be even (patch size 2)")
    start = time.time()
    if a.checkpoints:
        checkpoints = {name: a.checkpoints / name / "checkpoint.pth" for name in MODELS}
        missing = [str(c) for c in checkpoints.values() if not c.is_file()]
        if missing:
            p.error(f"no checkpoint at {', '.join(missing)}")
    else:
        checkpoints = train_demo_models(a.output_dir, a.epochs)
    results = study(checkpoints, a.sizes, a.finetune_epochs, a.lr, a.batch_size, a.seed)
    text = table(results, a.sizes)
    print(text)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(dict(command="python -m tools.resolution_study " + " ".join(argv or sys.argv[1:]),
                                      sizes=a.sizes, epochs=a.epochs, finetune_epochs=a.finetune_epochs, lr=a.lr,
                                      normalisation=dict(mean=MEAN, std=STD), results=results, table=text,
                                      seconds=round(time.time() - start, 1)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
