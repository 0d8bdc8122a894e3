"""Continuing a classification run exactly where it stopped, and never losing one.

A resumed run must train as if it had never stopped: besides the weights, optimizer, schedule and EMA it
restores the best accuracy so far and every random stream (torch, numpy, Python, the training loader's
generator, CUDA), one set per rank under DDP. What is on disk is never replaced silently: an output folder
that already holds a run is reused only by ``--resume`` (a checkpoint in it, or ``auto``).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from karat import load_checkpoint
from karat.config import cli_flags, non_structural_options

_logger = logging.getLogger("classification")

CHECKPOINT = "checkpoint.pth"
AUTO = "auto"
# create_model keywords that change no parameter: a difference is reported, not refused.
# KArAt's own (impl) are marked in KArAtConfig.
NON_STRUCTURAL = ("drop_rate", "drop_path_rate")
# The flag that sets each create_model keyword (the rest come from --model-kwargs); KArAt's are KArAtConfig's.
FLAG_OF = {"img_size": "--input-size", "num_classes": "--data-set (its class count)",
           "drop_rate": "--drop", "drop_path_rate": "--drop-path"}


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run, with the reason and the fix."""


# ----------------------------------------------------------------------------------------------- output folder
def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def resolve_resume(args: argparse.Namespace) -> str:
    """``--resume auto``: ``<output_dir>/checkpoint.pth`` when it exists, else a fresh start ('' )."""
    if args.resume != AUTO:
        return args.resume
    if not args.output_dir:
        raise ResumeError("--resume auto continues the run in --output_dir, but no --output_dir was given.")
    ckpt = Path(args.output_dir) / CHECKPOINT
    if ckpt.is_file():
        _logger.info("--resume auto: continuing from %s", ckpt)
        return str(ckpt)
    _logger.info("--resume auto: %s holds no %s yet, starting a new run", args.output_dir, CHECKPOINT)
    return ""


def check_output_dir(output_dir: str, resume: str) -> None:
    """An output folder that already holds files is reused only to continue the run whose checkpoint is in it;
    otherwise its ``checkpoint.pth``, ``args.json`` and logs would be replaced."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output_dir {out} is a file, not a folder: choose another --output_dir.")
    if not _is_nonempty_dir(out):
        return
    if resume and Path(resume).resolve().parent == out.resolve():
        return
    held = sorted(p.name for p in out.iterdir())
    shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
    why = (f"--resume {resume} is not in it" if resume else "no --resume was given")
    raise FileExistsError(
        f"--output_dir {out} already holds files ({shown}) and {why}, so they would be overwritten. "
        f"To continue that run, pass --resume {out / CHECKPOINT} (or --resume auto); "
        f"to start a new run, choose another --output_dir.")


def write_args(out_dir: Path, args: argparse.Namespace, resumed_from: Optional[int]) -> Path:
    """``args.json`` for a new run; a resumed run keeps it and writes ``args_resume_epoch<N>[_k].json`` beside."""
    text = json.dumps(vars(args), indent=1, default=str)
    stem = "args" if resumed_from is None else f"args_resume_epoch{resumed_from + 1}"
    for k in range(1000):
        path = out_dir / (f"{stem}.json" if k == 0 else f"{stem}_{k}.json")
        try:
            with open(path, "x") as f:  # exclusive: never replaces a file
                f.write(text)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{out_dir} holds 1000 {stem}_*.json files; clean it up.")


def trim_log(out_dir: Path, last_epoch: int) -> None:
    """Epochs after the checkpoint's (trained, logged, then lost in a crash) are trained again: their lines move
    from ``log.txt`` to ``log.superseded.txt`` so the log holds each epoch once."""
    log = out_dir / "log.txt"
    if not log.is_file():
        return
    keep, drop = [], []
    for line in log.read_text().splitlines():
        (drop if line.strip() and json.loads(line).get("epoch", -1) > last_epoch else keep).append(line)
    if drop:
        with open(out_dir / "log.superseded.txt", "a") as f:
            f.write("\n".join(drop) + "\n")
        tmp = log.with_name(".log.txt.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(log)
        _logger.info("log.txt: %d line(s) after epoch %d moved to log.superseded.txt", len(drop), last_epoch)


# ------------------------------------------------------------------------------------------------ RNG streams
def rng_state(generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """This process's random streams as tensors and plain values (a weights-only checkpoint can hold them)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = dict(torch=torch.get_rng_state(),
                                 numpy=[torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                                 python=[version, list(internal), gauss_next])
    if generator is not None:
        state["loader"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generator: Optional[torch.Generator] = None) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def start_rng_streams(seed: int, generator: torch.Generator, states: Any = None, rank: int = 0, world: int = 1) -> None:
    """Right before the first epoch: the training streams start from ``seed`` (whatever setup and lazy imports drew
    before), or continue from a checkpoint's ``states``, so both runs draw the same numbers from here on. The
    training seed is offset from the one that initialised the weights, so masks never replay the init's numbers."""
    train_seed = (seed + (1 << 31)) % (1 << 32)
    torch.manual_seed(train_seed)
    np.random.seed(train_seed)
    random.seed(train_seed)
    generator.manual_seed(train_seed)
    if states is not None:
        restore_rng_states(states, rank, world, generator)


def all_rank_rng_states(generator: Optional[torch.Generator], distributed: bool) -> List[Dict[str, Any]]:
    """Every rank's streams, in rank order (a collective under DDP: all ranks call it, rank 0 saves the list)."""
    state = rng_state(generator)
    if not distributed:
        return [state]
    states: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states: Any, rank: int, world: int, generator: Optional[torch.Generator] = None) -> bool:
    """Rank ``rank`` takes its own streams back. A checkpoint of another world size cannot give every rank its
    own: then each keeps its fresh ``seed + rank`` streams (said in the log). Returns whether they were restored."""
    if isinstance(states, Mapping):  # checkpoints written before per-rank states: one process's streams
        states = [states]
    if len(states) != world:
        _logger.warning("the checkpoint holds random states of %d process(es), this run has %d: each rank keeps "
                        "its fresh seed + rank streams, so data order and augmentation differ from an "
                        "uninterrupted run", len(states), world)
        return False
    set_rng_state(states[rank], generator)
    return True


# --------------------------------------------------------------------------------------------- checkpoint parts
def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _flag(key: str) -> str:
    return {**cli_flags(), **FLAG_OF}.get(key, f"--model-kwargs {key}=...")


def check_architecture(ckpt: Mapping[str, Any], model_name: str, model_kwargs: Mapping[str, Any], path: str) -> None:
    """The recorded ``model_name`` / ``model_kwargs`` against this run's, before any tensor is copied: a
    difference is named with the flag that sets it (instead of torch's ``size mismatch``)."""
    if "model_name" not in ckpt:
        return
    if ckpt["model_name"] != model_name:
        raise ResumeError(f"{path} was trained as {ckpt['model_name']}, this run builds {model_name}: "
                          f"resume with --model {ckpt['model_name']} (and the run's other flags).")
    saved, now = _plain(ckpt.get("model_kwargs") or {}), _plain(model_kwargs)
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    structural = [k for k in differ if k not in NON_STRUCTURAL + non_structural_options()]
    if structural:
        lines = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {now.get(k)!r} (set by {_flag(k)})"
                          for k in structural)
        raise ResumeError(f"{path} holds another architecture than this run builds ({lines}). "
                          f"Resume with the flags the run was started with (its args.json).")
    for k in differ:
        _logger.warning("resume: %s was %r in %s, is %r now", k, saved.get(k), path, now.get(k))


def load_model_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    """``load_state_dict(strict=True)``, with missing, unexpected and differently shaped tensors named first."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{name} {items[:4]}{' ...' if len(items) > 4 else ''}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", shapes)) if items]
        raise ResumeError(f"{path} does not fit this model: {'; '.join(parts)}. --resume continues the same "
                          f"architecture; to start from weights of another size or task use --finetune.")
    model.load_state_dict(state)


def restore_scaler(scaler: torch.amp.GradScaler, state: Optional[Mapping[str, Any]], path: str) -> None:
    """AMP may be switched on or off between runs: a checkpoint without scaler state starts AMP with a fresh
    loss scale; a scaler state in a run without AMP is ignored. Both are said in the log."""
    if scaler.is_enabled() and not state:
        _logger.info("%s holds no GradScaler state (trained without AMP): AMP starts with a fresh loss scale", path)
    elif not scaler.is_enabled() and state:
        _logger.info("%s holds GradScaler state but this run trains without AMP: ignored", path)
    elif state:
        scaler.load_state_dict(dict(state))


def read_resume_checkpoint(path: str) -> Tuple[Dict[str, Any], bool]:
    """The checkpoint and whether it is a full training state. A bare state dict (or timm's ``state_dict``
    checkpoint) is accepted as weights only, as timm's ``train.py --resume`` does, with a warning."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise ResumeError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint: give the checkpoint.pth "
                          f"classification.main writes.")
    if "model" in ckpt and "epoch" in ckpt:
        return dict(ckpt), True
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ResumeError(f"{path} is neither a classification.main checkpoint (model, optimizer, epoch, ...) "
                          f"nor a state dict of tensors.")
    _logger.warning("%s is a bare state dict (no optimizer, schedule or epoch): loaded as model weights only, "
                    "as timm's train.py does; training starts at --start_epoch with a fresh optimizer. Use "
                    "--finetune for weights of another size or task.", path)
    return {"model": dict(state)}, False


def resume(ckpt: Mapping[str, Any], full: bool, path: str, model: torch.nn.Module, model_name: str,
           model_kwargs: Mapping[str, Any], weights_only: bool = False, **parts: Any) -> Tuple[Optional[int], float]:
    """Load ``ckpt`` into the model and (unless ``weights_only``, e.g. ``--eval``) into ``parts``: optimizer,
    lr_scheduler, scaler, model_ema (the RNG streams are restored by :func:`start_rng_streams`).
    Returns (the checkpoint's epoch or None for weights only, the best accuracy so far)."""
    check_architecture(ckpt, model_name, model_kwargs, path)
    load_model_weights(model, ckpt["model"], path)
    if not full:
        return None, 0.0
    if not weights_only:
        parts["optimizer"].load_state_dict(ckpt["optimizer"])
        parts["lr_scheduler"].load_state_dict(ckpt["lr_scheduler"])
        restore_scaler(parts["scaler"], ckpt.get("scaler"), path)
        if parts.get("model_ema") is not None:
            if "model_ema" in ckpt:
                parts["model_ema"].load_state_dict(ckpt["model_ema"])
            else:
                _logger.warning("%s holds no EMA weights: the EMA restarts from the resumed model", path)
    if "max_accuracy" not in ckpt:
        _logger.warning("%s does not record max_accuracy (an older checkpoint): the best accuracy restarts at 0", path)
    return int(ckpt["epoch"]), float(ckpt.get("max_accuracy", 0.0))
