"""The reference path: ``sigma(S)`` materialised, then ``sigma(S) V`` (spec section 3).

The oracle every other path is tested against, and the one path that can hand out ``sigma(S)`` itself
(attention maps, dropout on its entries, the L1 projection). Memory O(N^2) per head.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..operator import KArAtOperator
from ..precision import full_precision_attention


def sigma(op: KArAtOperator, q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor],
          key_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``sigma(scale q k^T + bias)``: ``(B, H, N, N)``."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return op(logits, key_mask)


@full_precision_attention
def attend(op: KArAtOperator, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
           key_mask: Optional[torch.Tensor] = None, scale: float = 1.0,
           on_sigma: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``sigma(S) V`` in fp32 like the other paths; ``on_sigma`` sees (and may replace, e.g. by dropout) the
    materialised ``sigma(S)`` before it weights ``V``."""
    s = sigma(op, q, k, bias, key_mask, scale)
    if on_sigma is not None:
        s = on_sigma(s)
    return s @ v
