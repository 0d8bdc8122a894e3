"""Replacing a host's attention modules by KArAt versions after the host model is built."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn


def swap_modules(model: nn.Module, target: type, build: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every module of exactly type ``target`` by ``build(old)``, moved to the old module's device and
    dtype and loaded with its weights (the KArAt tensors are new). Returns how many were replaced."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not target:
            continue
        new = build(module)
        ref = next(module.parameters())
        new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(module.state_dict(), strict=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        count += 1
    return count
