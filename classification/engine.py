"""One training epoch and one evaluation pass, shared by the demo and the classification entry point."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm


@dataclass
class EpochStats:
    loss: float
    top1: float
    seconds: float


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: Callable, optimizer: torch.optim.Optimizer,
                    epoch: int, lr_scheduler=None, clip_grad: Optional[float] = None, desc: str = "train",
                    device: torch.device | str = "cpu") -> EpochStats:
    model.train()
    start, total, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
    num_updates = epoch * len(loader)
    bar = tqdm(loader, desc=f"{desc} epoch {epoch}", leave=False, dynamic_ncols=True)
    for images, targets in bar:
        images, targets = images.to(device), targets.to(device)
        logits = model(images)
        loss = criterion(logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        num_updates += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        n = targets.numel()
        total += n
        loss_sum += loss.item() * n
        correct += (logits.argmax(-1) == targets).sum().item()
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{100 * correct / total:.1f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return EpochStats(loss_sum / total, 100.0 * correct / total, time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> EpochStats:
    model.eval()
    start, total, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        total += targets.numel()
    return EpochStats(loss_sum / total, 100.0 * correct / total, time.perf_counter() - start)
