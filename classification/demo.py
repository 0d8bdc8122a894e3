"""Demo stage 1: a Fourier-KArAt ViT-Tiny and the softmax ViT-Tiny it modifies, trained side by side on the
embedded digits images, with checkpoints, TensorBoard logs, JSON-lines metrics, a learning-curve PNG and
a picture of both models' attention maps."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import timm
import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

import karat  # noqa: F401  registers the KArAt models
from karat import param_groups, save_checkpoint

from .attention_maps import attention_maps, plot_attention
from .digits import IMG_SIZE, NUM_CLASSES, load_digits_split
from .engine import evaluate, train_one_epoch

_logger = logging.getLogger(__name__)

# What the demo trains: declarative, the same ViT-Tiny body with and without KArAt. 16 patch tokens of
# 2 x 2 pixels, average-pooled (no class token), which trains faster than a class token on 1.4k images.
DIGITS_VIT = dict(img_size=IMG_SIZE, patch_size=2, in_chans=1, num_classes=NUM_CLASSES, class_token=False,
                  global_pool="avg")
DEMO_MODELS: Dict[str, Dict[str, Any]] = {
    "softmax": dict(model="vit_tiny_patch16_224", kwargs=DIGITS_VIT),
    "karat": dict(model="vit_tiny_patch16_224_karat",
                  kwargs=dict(DIGITS_VIT, basis_type="FourierBasis", grid=3, hidden_dim=12, modular_attn=True,
                              modular_mode="phi1_w2", blockwise=True)),
}


@dataclasses.dataclass
class DemoSettings:
    epochs: int = 12
    batch_size: int = 32
    lr: float = 5e-4
    attn_lr: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    smoothing: float = 0.1
    clip_grad: float | None = 1.0
    seed: int = 0
    train_limit: int | None = None  # use only the first n training images (tests)


def train_model(name: str, spec: Dict[str, Any], settings: DemoSettings, out_dir: Path) -> Tuple[Dict[str, Any], nn.Module]:
    """Train one model; returns its results (params, per-epoch history, accuracy, time) and the model."""
    torch.manual_seed(settings.seed)
    train_set, val_set = load_digits_split(seed=settings.seed)
    if settings.train_limit:
        train_set = torch.utils.data.Subset(train_set, range(settings.train_limit))
    g = torch.Generator().manual_seed(settings.seed)
    train_loader = DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, drop_last=True, generator=g)
    val_loader = DataLoader(val_set, batch_size=256)

    model = timm.create_model(spec["model"], **spec["kwargs"])
    optimizer = create_optimizer_v2(param_groups(model, settings.weight_decay, settings.attn_lr), opt="adamw",
                                    lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=settings.epochs,
                                       warmup_epochs=settings.warmup_epochs, warmup_lr=settings.lr / 100,
                                       min_lr=settings.lr / 100, step_on_epochs=False,
                                       updates_per_epoch=len(train_loader))
    criterion = LabelSmoothingCrossEntropy(settings.smoothing)
    run_dir = out_dir / name
    run_dir.mkdir(parents=True)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    history: List[Dict[str, float]] = []
    params = sum(p.numel() for p in model.parameters())
    with open(run_dir / "metrics.jsonl", "w") as log:
        for epoch in range(settings.epochs):
            tr = train_one_epoch(model, train_loader, criterion, optimizer, epoch, scheduler,
                                 clip_grad=settings.clip_grad, desc=name)
            va = evaluate(model, val_loader)
            row = dict(epoch=epoch, train_loss=tr.loss, train_top1=tr.top1, val_loss=va.loss, val_top1=va.top1,
                       epoch_seconds=tr.seconds, lr=optimizer.param_groups[0]["lr"])
            history.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            for key in ("train_loss", "train_top1", "val_loss", "val_top1", "epoch_seconds", "lr"):
                writer.add_scalar(key, row[key], epoch)
            save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch,
                                 model_name=spec["model"], model_kwargs=spec["kwargs"], metrics=row),
                            run_dir / "checkpoint.pth")
            _logger.info("%-7s epoch %2d  loss %.3f  val top-1 %5.1f%%  (%.1fs)", name, epoch, tr.loss, va.top1,
                         tr.seconds)
    writer.close()
    result = dict(name=name, model=spec["model"], params=params, history=history,
                  top1=history[-1]["val_top1"], best_top1=max(r["val_top1"] for r in history),
                  seconds_per_epoch=sum(r["epoch_seconds"] for r in history) / len(history))
    return result, model


def plot_curves(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = [h["epoch"] + 1 for h in r["history"]]
        ax_acc.plot(epochs, [h["val_top1"] for h in r["history"]], marker="o", label=r["name"])
        ax_loss.plot(epochs, [h["train_loss"] for h in r["history"]], marker="o", label=r["name"])
    ax_acc.set(xlabel="epoch", ylabel="held-out top-1 (%)", title="digits: held-out accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="digits: training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(results: List[Dict[str, Any]]) -> str:
    lines = ["| model | params (M) | top-1 final (%) | top-1 best (%) | s / epoch |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} ({r['model']}) | {r['params'] / 1e6:.3f} | {r['top1']:.1f} | "
                     f"{r['best_top1']:.1f} | {r['seconds_per_epoch']:.1f} |")
    return "\n".join(lines)


def run(out_dir: Path, settings: DemoSettings) -> List[Dict[str, Any]]:
    """Train both models, then write ``summary.json``, ``summary.md``, ``learning_curves.png`` and
    ``attention_maps.png``."""
    trained = [train_model(name, spec, settings, out_dir) for name, spec in DEMO_MODELS.items()]
    results = [r for r, _ in trained]
    image = load_digits_split(seed=settings.seed)[1][0][0].unsqueeze(0)  # first held-out image
    grid = (IMG_SIZE // DIGITS_VIT["patch_size"],) * 2
    plot_attention({r["name"]: attention_maps(m, image) for r, m in trained}, image, grid,
                   out_dir / "attention_maps.png")
    (out_dir / "summary.json").write_text(json.dumps(dict(settings=dataclasses.asdict(settings), results=results), indent=1))
    table = summary_table(results)
    (out_dir / "summary.md").write_text(table + "\n")
    plot_curves(results, out_dir / "learning_curves.png")
    return results
