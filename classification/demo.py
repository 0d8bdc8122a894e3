"""Demo stage 1: a Fourier-KArAt ViT-Tiny and the softmax ViT-Tiny it modifies, trained side by side on the
embedded digits images by the classification entry point itself (``classification.main``, the paper's command
line), then compared: a summary table, a learning-curve PNG and a picture of both models' attention maps."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import timm
import torch.nn as nn

import karat  # noqa: F401  registers the KArAt models
from karat import load_checkpoint

from .args import get_args_parser
from .attention_maps import attention_maps, plot_attention
from karat.digits import IMG_SIZE, load_digits_split
from .main import main as train_classifier

_logger = logging.getLogger(__name__)

# What the demo trains, as the paper's command line: the same ViT-Tiny body with and without KArAt (KArAt flags
# on a softmax model name select its KArAt twin). 16 patch tokens of 2 x 2 pixels of the 1-channel 8 x 8 digits,
# average-pooled (no class token), which trains faster than a class token on 1.4k images.
DIGITS_VIT = ["--model-kwargs", "patch_size=2", "in_chans=1", "class_token=False", "global_pool=avg"]
DEMO_MODELS: Dict[str, List[str]] = {
    "softmax": ["--model", "vit_tiny_patch16_224"],
    "karat": ["--model", "vit_tiny_patch16_224", "--basis_type", "FourierBasis", "--grid", "3", "--hidden_dim", "12",
              "--modular_mode", "phi1_w2", "--blockwise"],
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
    keep_every: int | None = None  # epochs between the weights kept for the optimizer path (None: epochs // 4)
    analysis: bool = True  # run karat.analysis (all six families) on the two classifiers
    analysis_quick: bool = False  # the smallest landscape grid and image set (smoke tests)

    def command_line(self, out_dir: Path) -> List[str]:
        """The classification.main flags of this recipe (the model's own flags come from DEMO_MODELS)."""
        args = ["--data-set", "DIGITS", "--input-size", str(IMG_SIZE), *DIGITS_VIT, "--device", "cpu",
                "--num_workers", "0", "--output_dir", str(out_dir), "--epochs", str(self.epochs),
                "--batch-size", str(self.batch_size), "--lr", str(self.lr), "--warmup-lr", str(self.lr / 100),
                "--min-lr", str(self.lr / 100), "--warmup-epochs", str(self.warmup_epochs), "--cooldown-epochs", "0",
                "--weight-decay", str(self.weight_decay), "--smoothing", str(self.smoothing), "--mixup", "0",
                "--cutmix", "0", "--drop-path", "0", "--sched-on-updates", "--seed", str(self.seed)]
        if self.clip_grad:
            args += ["--clip-grad", str(self.clip_grad)]
        if self.attn_lr:
            args += ["--attn_lr", str(self.attn_lr)]
        if self.train_limit:
            args += ["--train-subset", str(self.train_limit)]
        args += ["--keep-every", str(self.keep_every or max(1, self.epochs // 4))]
        return args


def train_model(name: str, model_flags: List[str], settings: DemoSettings, out_dir: Path) -> Tuple[Dict[str, Any], nn.Module]:
    """Train one model with classification.main; returns its results (params, per-epoch history, accuracy,
    time) read back from what the entry point wrote, and the trained model rebuilt from its checkpoint."""
    run_dir = out_dir / name
    argv = settings.command_line(run_dir) + model_flags
    _logger.info("%s: python -m classification.main %s", name, " ".join(argv))
    train_classifier(get_args_parser().parse_args(argv))
    ckpt = load_checkpoint(run_dir / "checkpoint.pth")
    model = timm.create_model(ckpt["model_name"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    history = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]
    result = dict(name=name, model=ckpt["model_name"], params=sum(p.numel() for p in model.parameters()),
                  command="python -m classification.main " + " ".join(argv), history=history,
                  top1=history[-1]["test_acc1"], best_top1=max(r["test_acc1"] for r in history),
                  seconds_per_epoch=sum(r["epoch_seconds"] for r in history) / len(history))
    return result, model


def plot_curves(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = [h["epoch"] + 1 for h in r["history"]]
        ax_acc.plot(epochs, [h["test_acc1"] for h in r["history"]], marker="o", label=r["name"])
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
    trained = [train_model(name, flags, settings, out_dir) for name, flags in DEMO_MODELS.items()]
    results = [r for r, _ in trained]
    image = load_digits_split(seed=settings.seed)[1][0][0].unsqueeze(0)  # first held-out image
    grid = tuple(trained[0][1].patch_embed.grid_size)
    plot_attention({r["name"]: attention_maps(m, image) for r, m in trained}, image, grid,
                   out_dir / "attention_maps.png")
    (out_dir / "summary.json").write_text(json.dumps(dict(settings=dataclasses.asdict(settings), results=results), indent=1))
    table = summary_table(results)
    (out_dir / "summary.md").write_text(table + "\n")
    plot_curves(results, out_dir / "learning_curves.png")
    if settings.analysis:
        run_analysis(out_dir, settings.analysis_quick)
    return results


def run_analysis(out_dir: Path, quick: bool = False) -> Dict[str, Any]:
    """``python -m tools.analyze karat/checkpoint.pth --compare softmax/checkpoint.pth --out analysis`` (defaults:
    the held-out digits, the small landscape grid; ``quick``: a 3 x 3 grid on 16 images)."""
    from karat.analysis.cli import main as analyze

    argv = [str(out_dir / "karat" / "checkpoint.pth"), "--compare", str(out_dir / "softmax" / "checkpoint.pth"),
            "--out", str(out_dir / "analysis")]
    if quick:
        argv += ["--points", "3", "--grid", "3", "--batches", "1", "--batch-size", "16", "--num-images", "16"]
    _logger.info("analysis: python -m tools.analyze %s", " ".join(argv))
    if analyze(argv) != 0:
        raise RuntimeError("the analysis of the demo's classifiers failed (see the error above)")
    return json.loads((out_dir / "analysis" / "analysis.json").read_text())
