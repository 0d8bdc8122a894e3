"""Optimizer parameter groups that give KArAt parameters their own learning rate (``--attn_lr``)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch.nn as nn

from .operator import KArAtOperator


def karat_parameter_names(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of every parameter inside a KArAt operator."""
    ids = {id(p) for m in model.modules() if isinstance(m, KArAtOperator) for p in m.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def param_groups(model: nn.Module, weight_decay: float = 0.05, attn_lr: Optional[float] = None,
                 no_weight_decay_list: Iterable[str] = ()) -> List[Dict[str, Any]]:
    """timm-style groups (no weight decay on biases, norms, 1-D tensors and ``no_weight_decay_list``),
    with KArAt parameters in groups of their own that carry ``lr=attn_lr`` when it is given.

    The result goes straight into ``timm.optim.create_optimizer_v2(groups, ...)`` or any torch optimizer;
    timm's schedulers scale each group from its own initial learning rate.
    """
    skip = set(no_weight_decay_list)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    karat = karat_parameter_names(model)
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        is_karat = name in karat
        key = (is_karat, decay)
        if key not in groups:
            group: Dict[str, Any] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                     "name": ("karat" if is_karat else "model") + ("_decay" if decay else "_no_decay")}
            if is_karat and attn_lr is not None:
                group["lr"] = attn_lr
            groups[key] = group
        groups[key]["params"].append(p)
    return list(groups.values())
