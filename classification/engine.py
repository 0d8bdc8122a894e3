"""One training epoch and one evaluation pass, shared by the demo and the classification entry point."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from karat.progress import on_terminal

_logger = logging.getLogger("classification")


@dataclass
class EpochStats:
    loss: float
    top1: float
    seconds: float
    top5: float = math.nan


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA (with a GradScaler, as DeiT trains); bf16 elsewhere, the dtype CPU autocast supports best."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def resolve_amp(requested: Optional[bool], device: torch.device | str) -> bool:
    """``--amp``: unset means on for CUDA and off elsewhere (bf16 on a CPU is often slower than fp32, so it
    is used there only when asked for with ``--amp True``)."""
    on = torch.device(device).type == "cuda" if requested is None else requested
    if on:
        _logger.info("mixed precision: %s autocast on %s", amp_dtype(device), torch.device(device).type)
    return on


def _autocast(device: torch.device | str, amp: bool):
    device = torch.device(device)
    return torch.autocast(device.type, dtype=amp_dtype(device)) if amp else contextlib.nullcontext()


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: Callable, optimizer: torch.optim.Optimizer,
                    epoch: int, lr_scheduler=None, clip_grad: Optional[float] = None, desc: str = "train",
                    device: torch.device | str = "cpu", mixup_fn: Optional[Callable] = None,
                    scaler: Optional[torch.amp.GradScaler] = None, amp: bool = False, model_ema=None,
                    show_progress: bool = True) -> EpochStats:
    """One epoch. ``lr_scheduler.step_update`` runs per step (timm schedulers); with ``mixup_fn`` the targets
    are soft, so training accuracy is not reported (NaN)."""
    model.train()
    start, total, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
    num_updates = epoch * len(loader)
    # a bar on a terminal only; in a log file the caller's line per epoch says it (karat.progress)
    bar = tqdm(loader, desc=f"{desc} epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=not (show_progress and on_terminal()))
    for images, targets in bar:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        hard_targets = targets
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with _autocast(device, amp):
            logits = model(images)
            loss = criterion(logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        if model_ema is not None:
            model_ema.update(model)
        num_updates += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        n = hard_targets.numel()
        total += n
        loss_sum += loss.item() * n
        if mixup_fn is None:
            correct += (logits.argmax(-1) == hard_targets).sum().item()
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        **({} if mixup_fn else {"acc": f"{100 * correct / total:.1f}"}))
    top1 = math.nan if mixup_fn is not None else 100.0 * correct / total
    return EpochStats(loss_sum / total, top1, time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", amp: bool = False) -> EpochStats:
    """Cross-entropy, top-1 and top-5 accuracy (in %) over ``loader``."""
    model.eval()
    start, total, correct1, correct5, loss_sum = time.perf_counter(), 0, 0, 0, 0.0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with _autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets[:, None]).any(-1).sum().item()
        total += targets.numel()
    return EpochStats(loss_sum / total, 100.0 * correct1 / total, time.perf_counter() - start,
                      top5=100.0 * correct5 / total)
