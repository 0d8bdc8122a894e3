"""Parameter bookkeeping around the zero base: counts as the paper reports them, and old checkpoints.

With the paper's default base function (``base_fn='ZeroModule'``) a KAN layer has no base weight ``w_b``: it would
never take part in the forward pass, so it would get no gradient (timm's model tests and DDP without
``find_unused_parameters`` reject such parameters). The paper's implementation still allocated ``w_b``, and its
parameter counts include it (ViT-Ti G3B 6.29 M, ...); :func:`paper_param_count` adds it back for comparison.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from .attention import is_karat_key
from .kan import KANLayer

BASE_WEIGHT = "base_weight"


def paper_param_count(model: nn.Module) -> int:
    """Parameters as the paper's tables count them: ``model``'s parameters plus, for every KAN layer with the zero
    base, the ``heads x in x out`` base weight the paper's code allocated but never used. Shared (universal)
    operators count once, as in ``model.parameters()``."""
    unused_base = sum(m.num_heads * m.in_features * m.out_features for m in model.modules()
                      if isinstance(m, KANLayer) and m.base_weight is None)
    return sum(p.numel() for p in model.parameters()) + unused_base


def drop_unused_base_weights(state_dict: Mapping[str, torch.Tensor], model: nn.Module
                             ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``state_dict`` without the KArAt base weights ``model`` does not have (checkpoints written before the zero
    base stopped storing ``w_b``), and the names dropped. ``model.load_state_dict`` drops them by itself; this is
    for code that compares a checkpoint's names with the model's first (converters, checkpoint filters)."""
    own = model.state_dict()
    dropped = [k for k in state_dict if k.endswith("." + BASE_WEIGHT) and is_karat_key(k) and k not in own]
    gone = set(dropped)
    return {k: v for k, v in state_dict.items() if k not in gone}, dropped
