"""The classification command line: the paper's (DeiT's) arguments, same names and meanings."""
from __future__ import annotations

import argparse

from timm.utils import ParseKwargs

from karat.config import add_argparse_arguments, kwargs_from_namespace
from karat.distributed import DEFAULT_INIT_TIMEOUT
from karat.options import str2bool

DATASETS = ("CIFAR10", "CIFAR100", "IMNET", "SVHN", "Flowers102", "STL10", "DIGITS")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """How and where a run goes: epochs, output folder, resume, logging, AMP."""
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", default=64, type=int)
    g.add_argument("--epochs", default=300, type=int)
    g.add_argument("--output_dir", default="", help="where to save checkpoints and logs (empty: no saving)")
    g.add_argument("--device", default="cuda", help="cuda or cpu (falls back to cpu when CUDA is missing)")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="checkpoint to continue from, or 'auto': <output_dir>/checkpoint.pth "
                   "when it exists (an --output_dir that holds a run is reused only this way)")
    g.add_argument("--start_epoch", default=0, type=int)
    g.add_argument("--eval", action="store_true", help="evaluation only")
    g.add_argument("--finetune", default="", help="checkpoint to fine-tune from (head reset, tokens resampled)")
    g.add_argument("--num_workers", default=4, type=int)
    g.add_argument("--pin-mem", action="store_true", default=True)
    g.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    g.add_argument("--run_name", default=None, help="Weights & Biases run name (W&B is used only when given)")
    g.add_argument("--run_id", default=None, help="Weights & Biases run id to resume")
    g.add_argument("--keep-every", type=int, default=0, metavar="K",
                   help="also keep every K-th epoch's weights as checkpoint-epochNNN.pth (for the optimizer-path "
                        "analysis, python -m tools.analyze); 0: keep only checkpoint.pth")
    g.add_argument("--dist-init-timeout", type=float, default=DEFAULT_INIT_TIMEOUT, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others to start the process group before it "
                        "fails naming the missing rank (the collectives keep torch's own timeout)")
    g.add_argument("--amp", type=str2bool, default=None,
                   help="mixed precision: fp16 autocast + GradScaler on CUDA (the default there), bf16 autocast on "
                        "CPU (only when given: --amp True)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The timm model and its regularisation."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_tiny_patch16_224_karat", help="timm model name")
    g.add_argument("--input-size", default=224, type=int)
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="extra timm.create_model keywords, e.g. --model-kwargs patch_size=2 in_chans=1 (timm's idiom)")
    g.add_argument("--drop", type=float, default=0.0)
    g.add_argument("--drop-path", type=float, default=0.1)
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    g.add_argument("--model-ema-decay", type=float, default=0.99996)
    g.set_defaults(model_ema=False)


def _add_optimizer_args(p: argparse.ArgumentParser) -> None:
    """The arguments of timm's optimizer and scheduler factories."""
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", default="adamw")
    g.add_argument("--opt-eps", default=1e-8, type=float)
    g.add_argument("--opt-betas", default=None, type=float, nargs="+")
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", action="store_true",
                   help="step the schedule every update instead of every epoch (timm's train.py flag)")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--decay-epochs", type=float, default=30)
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--cooldown-epochs", type=int, default=10)
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)


def _add_augmentation_args(p: argparse.ArgumentParser) -> None:
    """DeiT's augmentation, Mixup and CutMix."""
    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--color-jitter", type=float, default=0.3)
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="AutoAugment policy ('' for none)")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--train-interpolation", default="bicubic")
    g.add_argument("--repeated-aug", action="store_true")
    g.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    g.set_defaults(repeated_aug=False)
    g.add_argument("--reprob", type=float, default=0.25)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.8)
    g.add_argument("--cutmix", type=float, default=1.0)
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch")


def get_args_parser() -> argparse.ArgumentParser:
    """DeiT's command line (same flags, defaults and meanings) plus the KArAt options."""
    p = argparse.ArgumentParser("KArAt training and evaluation (DeiT recipe)", add_help=True)
    _add_run_args(p)
    _add_model_args(p)
    _add_optimizer_args(p)
    _add_augmentation_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data-set", default="IMNET", choices=DATASETS)
    g.add_argument("--data-path", default="", help="dataset folder (see README for the layout of each dataset)")
    g.add_argument("--download", action="store_true", help="let torchvision download the dataset when missing")
    g.add_argument("--train-subset", type=int, default=None, help="train on the first n images only (quick runs)")
    g = p.add_argument_group("KArAt")
    add_argparse_arguments(g)  # one flag per KArAtConfig option, named and documented there
    g.add_argument("--attn_lr", type=float, default=None, help="learning rate of the KArAt parameters")
    return p


def karat_kwargs(args: argparse.Namespace) -> dict:
    """``create_model`` keywords for a KArAt model from the parsed flags (``--depth`` is ``karat_depth``)."""
    return kwargs_from_namespace(args)
