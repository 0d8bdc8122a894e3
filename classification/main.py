"""DeiT-style training and evaluation of KArAt (and softmax) classifiers; the paper's command line.

  python -m classification.main --model vit_tiny_patch16_224_karat --data-set IMNET --data-path /imagenet ...
  torchrun --nproc_per_node=8 -m classification.main ...

Built on timm's utilities: transforms, Mixup, losses, optimizer and scheduler factories, ``ModelEmaV3``.
Checkpoints (``<output_dir>/checkpoint.pth``) are written atomically and hold everything ``--resume`` needs.
``main`` runs named steps: ``setup``, ``build_data``, ``build_models``, ``build_training``, ``resume_run``, then
``train_loop`` (``record_epoch`` writes each epoch's log line, checkpoint and scalars).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import karat  # noqa: F401  registers the KArAt models
from karat import load_checkpoint, param_groups, save_checkpoint
from karat.distributed import DEFAULT_INIT_TIMEOUT, end_process_group, init_method as karat_init_method
from karat.models.vision_transformer import karat_vit_filter_fn

from .args import get_args_parser, karat_kwargs
from .datasets import build_dataset
from .engine import evaluate, resolve_amp, train_one_epoch
from .resume import (all_rank_rng_states, check_output_dir, read_resume_checkpoint, resolve_resume, resume,
                     start_rng_streams, trim_log, write_args)

_logger = logging.getLogger("classification")


def init_distributed(init_timeout: float = DEFAULT_INIT_TIMEOUT) -> tuple[bool, int, int]:
    """torchrun's environment -> (distributed, rank, world size); gloo on CPU, nccl on CUDA. ``karat-env://`` keeps
    a group that torchrun restarts (``--max-restarts``) off the keys of the attempt before (karat/distributed.py)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False, 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=karat_init_method(init_timeout))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True, dist.get_rank(), dist.get_world_size()


def resolve_model_name(args: argparse.Namespace) -> str:
    """The paper's commands name the softmax model and add KArAt flags: then the ``_karat`` twin is meant.
    KArAt flags on a model without a KArAt twin are an error, never silently ignored."""
    karat_models = set(timm.list_models("*_karat"))
    if args.model in karat_models:
        return args.model
    given = explicit_karat_flags(args)
    if not given:
        return args.model
    twin = f"{args.model}_karat"
    if twin in karat_models:
        _logger.info("KArAt flags %s given with --model %s: training %s", given, args.model, twin)
        return twin
    raise ValueError(f"KArAt flags {given} were given but --model {args.model} has no KArAt version; "
                     f"choose one of {sorted(karat_models)}.")


def explicit_karat_flags(args: argparse.Namespace) -> list:
    defaults = get_args_parser().parse_args([])
    return [k for k in karat_kwargs(defaults) if karat_kwargs(args).get(k) != karat_kwargs(defaults).get(k)]


def model_spec(args: argparse.Namespace, num_classes: int) -> tuple[str, Dict[str, Any]]:
    """The timm model name and ``create_model`` keywords the flags describe (recorded in checkpoints, so a
    converter can rebuild the architecture)."""
    name = resolve_model_name(args)
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                                  img_size=args.input_size, **args.model_kwargs)
    if name in set(timm.list_models("*_karat")):  # KArAt flags go to KArAt models only
        kwargs.update(karat_kwargs(args))
    return name, kwargs


def check_input_channels(model: torch.nn.Module, dataset: Any, args: argparse.Namespace) -> None:
    """A dataset whose images have another channel count than the model's first layer fails here, clearly."""
    first = model.pretrained_cfg.get("first_conv")
    layer = model.get_submodule(first) if first else None
    wanted, got = getattr(layer, "in_channels", None), dataset[0][0].shape[0]
    if wanted is not None and wanted != got:
        raise ValueError(f"--data-set {args.data_set} images have {got} channel(s) but {args.model} takes {wanted}: "
                         f"add --model-kwargs in_chans={got}.")


def build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    name, kwargs = model_spec(args, num_classes)
    return timm.create_model(name, **kwargs)


def load_finetune(model: torch.nn.Module, path: str) -> None:
    """Start from a checkpoint of another task or size: the head is reset when its shape differs, position
    embeddings and KArAt weights are resampled to this model's token count (ViT family)."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("model", ckpt)
    own = model.state_dict()
    for name in [model.default_cfg.get("classifier", "head") + s for s in (".weight", ".bias")]:
        if name in state and name in own and state[name].shape != own[name].shape:
            _logger.info("fine-tune: dropping %s %s (this model: %s)", name, tuple(state[name].shape),
                         tuple(own[name].shape))
            del state[name]
    if hasattr(model, "patch_embed") and hasattr(model, "pos_embed"):  # ViT family: resample positions and KArAt
        state = karat_vit_filter_fn(state, model)
    result = model.load_state_dict(state, strict=False)
    _logger.info("fine-tune from %s: missing %s, unexpected %s", path, result.missing_keys, result.unexpected_keys)


@dataclass
class Run:
    """Where this process runs: torchrun's rank and world, the device and this rank's seed."""
    distributed: bool
    rank: int
    world: int
    device: torch.device
    seed: int


@dataclass
class Data:
    """The datasets, their loaders and what the loop needs besides: the sampler (its epoch is set under DDP), the
    generator of the training order (checkpointed per rank) and Mixup/CutMix."""
    train: Any
    val: Any
    num_classes: int
    loader_train: DataLoader
    loader_val: DataLoader
    sampler: Any
    generator: torch.Generator
    mixup_fn: Optional[Mixup]


@dataclass
class Models:
    """The model, its DDP wrapper (the model itself without DDP), its EMA and the name and keywords that rebuild it."""
    model: torch.nn.Module
    model_ddp: torch.nn.Module
    model_ema: Optional[ModelEmaV3]
    name: str
    kwargs: Dict[str, Any]


@dataclass
class Training:
    """What updates the weights: optimizer, schedule, loss, and mixed precision (autocast flag and GradScaler)."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    amp: bool


@dataclass
class Start:
    """Where the loop starts: from --start_epoch, or after the resumed epoch with its best accuracy and RNG states."""
    epoch: int
    resumed_epoch: Optional[int] = None
    best: float = 0.0
    rng_states: Any = None


@dataclass
class Loggers:
    """The run's records: its folder (on every rank: all ranks gather RNG states) and rank 0's writers."""
    out_dir: Optional[Path]
    writer: Any = None
    wandb_run: Any = None


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Train (or with --eval, evaluate) as the flags say; returns the last epoch's statistics (the evaluation's)."""
    run = setup(args)
    data = build_data(args, run)
    models = build_models(args, data, run)
    training = build_training(args, models.model, len(data.loader_train), run.device, data.mixup_fn)
    start = resume_run(args, models, training)
    if args.eval:
        return evaluate_only(models.model, data, run.device, training.amp)
    loggers = open_loggers(args, run.rank, start.resumed_epoch)
    start_rng_streams(run.seed, data.generator, start.rng_states, run.rank, run.world)
    last = train_loop(args, run, data, models, training, loggers, start)
    if loggers.writer is not None:
        loggers.writer.close()
    if run.distributed:
        end_process_group()
    return last


def setup(args: argparse.Namespace) -> Run:
    """Logging, the process group, the device, this rank's seed, and a checked output folder."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    distributed, rank, world = init_distributed(args.dist_init_timeout)
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", torch.cuda.current_device())
    seed = args.seed + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    prepare_output_dir(args, distributed)
    return Run(distributed, rank, world, device, seed)


def build_data(args: argparse.Namespace, run: Run) -> Data:
    """The datasets and loaders; the training order comes from a generator of its own, checkpointed per rank."""
    dataset_train, num_classes = build_dataset(True, args)
    dataset_val, _ = build_dataset(False, args)
    if args.train_subset:
        dataset_train = torch.utils.data.Subset(dataset_train, range(min(args.train_subset, len(dataset_train))))
    generator = torch.Generator()  # the order of the training images (and worker seeds)
    generator.manual_seed(run.seed)
    if run.distributed:
        sampler = (RepeatAugSampler(dataset_train, num_replicas=run.world, rank=run.rank) if args.repeated_aug
                   else DistributedSampler(dataset_train, num_replicas=run.world, rank=run.rank, shuffle=True))
    else:
        sampler = RandomSampler(dataset_train, generator=generator)
    pin = args.pin_mem and run.device.type == "cuda"
    loader_train = DataLoader(dataset_train, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                              pin_memory=pin, drop_last=True, generator=generator)
    loader_val = DataLoader(dataset_val, sampler=SequentialSampler(dataset_val), batch_size=int(1.5 * args.batch_size),
                            num_workers=args.num_workers, pin_memory=pin)
    return Data(dataset_train, dataset_val, num_classes, loader_train, loader_val, sampler, generator,
                build_mixup(args, num_classes))


def build_mixup(args: argparse.Namespace, num_classes: int) -> Optional[Mixup]:
    """timm's Mixup/CutMix (with label smoothing) when any of them is on."""
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=num_classes)
    return None


def build_models(args: argparse.Namespace, data: Data, run: Run) -> Models:
    """The model (checked against the data, fine-tuned from --finetune), its EMA and its DDP wrapper."""
    name, kwargs = model_spec(args, data.num_classes)
    model = timm.create_model(name, **kwargs)
    check_input_channels(model, data.val, args)
    if args.finetune:
        load_finetune(model, args.finetune)
    model.to(run.device)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    # Every trainable KArAt parameter takes part in each forward (tests/test_ddp.py): no unused-parameter search.
    model_ddp = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False) if run.distributed
                 else model)
    return Models(model, model_ddp, model_ema, name, kwargs)


def build_training(args: argparse.Namespace, model: torch.nn.Module, updates_per_epoch: int, device: torch.device,
                   mixup_fn: Optional[Mixup]) -> Training:
    """timm's optimizer (KArAt parameters in their own group) and scheduler, AMP, and the loss for the targets."""
    optimizer = create_optimizer_v2(param_groups(model, args.weight_decay, args.attn_lr), opt=args.opt, lr=args.lr,
                                    weight_decay=args.weight_decay, momentum=args.momentum, eps=args.opt_eps,
                                    **({"betas": tuple(args.opt_betas)} if args.opt_betas else {}))
    lr_scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                          decay_epochs=args.decay_epochs, decay_rate=args.decay_rate,
                                          warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                          min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
                                          step_on_epochs=not args.sched_on_updates,
                                          updates_per_epoch=updates_per_epoch)
    amp = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")  # bf16 has fp32's range
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    return Training(optimizer, lr_scheduler, scaler, criterion, amp)


def resume_run(args: argparse.Namespace, models: Models, training: Training) -> Start:
    """--resume: the weights (only those under --eval) or the whole training state, and the epoch to go on from."""
    start = Start(epoch=args.start_epoch)
    if not args.resume:
        return start
    ckpt, full = read_resume_checkpoint(args.resume)
    start.rng_states = ckpt.get("rng")
    start.resumed_epoch, start.best = resume(ckpt, full, args.resume, models.model, models.name, models.kwargs,
                                             weights_only=args.eval, optimizer=training.optimizer,
                                             lr_scheduler=training.lr_scheduler, scaler=training.scaler,
                                             model_ema=models.model_ema)
    if start.resumed_epoch is not None and not args.eval:
        start.epoch = start.resumed_epoch + 1
        _logger.info("resumed from %s (epoch %d, best top-1 %.2f%%)", args.resume, start.resumed_epoch, start.best)
    return start


def evaluate_only(model: torch.nn.Module, data: Data, device: torch.device, amp: bool) -> Dict[str, Any]:
    """--eval: accuracy on the validation set, printed as DeiT prints it."""
    stats = evaluate(model, data.loader_val, device, amp)
    print(f"Accuracy of the network on the {len(data.val)} test images: top-1 {stats.top1:.2f}% "
          f"top-5 {stats.top5:.2f}% (loss {stats.loss:.4f})")
    return dict(top1=stats.top1, top5=stats.top5, loss=stats.loss)


def open_loggers(args: argparse.Namespace, rank: int, resumed_epoch: Optional[int]) -> Loggers:
    """Rank 0 records the arguments, trims a resumed log to its checkpoint and opens TensorBoard (and W&B)."""
    loggers = Loggers(Path(args.output_dir) if args.output_dir else None)
    if loggers.out_dir is None or rank != 0:
        return loggers
    loggers.out_dir.mkdir(parents=True, exist_ok=True)
    write_args(loggers.out_dir, args, resumed_epoch)
    if resumed_epoch is not None:
        trim_log(loggers.out_dir, resumed_epoch)
    from torch.utils.tensorboard import SummaryWriter

    loggers.writer = SummaryWriter(str(loggers.out_dir / "tensorboard"))
    if args.run_name:
        try:
            import wandb

            loggers.wandb_run = wandb.init(name=args.run_name, id=args.run_id,
                                           resume="allow" if args.run_id else None, config=vars(args),
                                           dir=str(loggers.out_dir))
        except ImportError:
            _logger.warning("--run_name given but wandb is not installed; logging to TensorBoard only")
    return loggers


def train_loop(args: argparse.Namespace, run: Run, data: Data, models: Models, training: Training, loggers: Loggers,
               start: Start) -> Dict[str, Any]:
    """Train and evaluate each epoch from ``start.epoch``; returns the last epoch's statistics."""
    last: Dict[str, Any] = {}
    best = start.best
    for epoch in range(start.epoch, args.epochs):
        if run.distributed:
            data.sampler.set_epoch(epoch)
        tr = train_one_epoch(models.model_ddp, data.loader_train, training.criterion, training.optimizer, epoch,
                             training.lr_scheduler, clip_grad=args.clip_grad, device=run.device,
                             mixup_fn=data.mixup_fn, scaler=training.scaler, amp=training.amp,
                             model_ema=models.model_ema, show_progress=run.rank == 0, desc=args.model)
        training.lr_scheduler.step(epoch + 1)
        va = evaluate(models.model, data.loader_val, run.device, training.amp)
        best = max(best, va.top1)
        last = dict(epoch=epoch, train_loss=tr.loss, test_loss=va.loss, test_acc1=va.top1, test_acc5=va.top5,
                    max_accuracy=best, lr=training.optimizer.param_groups[0]["lr"], epoch_seconds=tr.seconds,
                    n_parameters=sum(p.numel() for p in models.model.parameters()))
        _logger.info("epoch %d: train loss %.4f, test top-1 %.2f%% top-5 %.2f%% (best %.2f%%)", epoch, tr.loss,
                     va.top1, va.top5, best)
        record_epoch(args, run, data.generator, models, training, loggers, last)
    return last


def record_epoch(args: argparse.Namespace, run: Run, generator: torch.Generator, models: Models, training: Training,
                 loggers: Loggers, stats: Dict[str, Any]) -> None:
    """The epoch's log line, then its checkpoint (atomic, with every rank's RNG states), kept weights and scalars."""
    out_dir = loggers.out_dir
    rng = all_rank_rng_states(generator, run.distributed) if out_dir is not None else None  # all ranks take part
    if out_dir is None or run.rank != 0:
        return
    epoch = stats["epoch"]
    with open(out_dir / "log.txt", "a") as f:  # before the checkpoint: a resume trims what follows it
        f.write(json.dumps(stats) + "\n")
    state = dict(model=models.model.state_dict(), optimizer=training.optimizer.state_dict(),
                 lr_scheduler=training.lr_scheduler.state_dict(), scaler=training.scaler.state_dict(), epoch=epoch,
                 max_accuracy=stats["max_accuracy"], model_name=models.name, model_kwargs=models.kwargs,
                 args=vars(args) | {"grid_range": list(args.grid_range)}, rng=rng)
    if models.model_ema is not None:
        state["model_ema"] = models.model_ema.state_dict()
    save_checkpoint(_plain(state), out_dir / "checkpoint.pth")
    keep_epoch_weights(state, out_dir, epoch, args.keep_every)
    for key, value in stats.items():
        loggers.writer.add_scalar(key, value, epoch)
    if loggers.wandb_run is not None:
        loggers.wandb_run.log(stats, step=epoch)


def prepare_output_dir(args: argparse.Namespace, distributed: bool) -> None:
    """Resolve ``--resume auto`` and refuse an output folder that holds another run, on every rank before any
    rank writes to it."""
    args.resume = resolve_resume(args)
    if args.output_dir and not args.eval:  # --eval writes nothing there
        check_output_dir(args.output_dir, args.resume)
    if distributed:
        dist.barrier()


def keep_epoch_weights(state: Dict[str, Any], out_dir: Path, epoch: int, every: int) -> None:
    """``--keep-every K``: every K-th epoch's weights (with what rebuilds the model) as ``checkpoint-epochNNN.pth``,
    the optimizer path that ``python -m tools.analyze`` draws."""
    if every > 0 and (epoch + 1) % every == 0:
        keep = {k: state[k] for k in ("model", "epoch", "model_name", "model_kwargs", "args")}
        save_checkpoint(_plain(keep), out_dir / f"checkpoint-epoch{epoch:03d}.pth")


def _plain(obj: Any) -> Any:
    """Make a checkpoint loadable with ``weights_only=True``: tuples/paths/None-safe plain containers."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def cli(argv: Optional[List[str]] = None) -> int:
    """The command line (``python -m classification.main``, ``main.py``, ``karat-train``)."""
    main(get_args_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
