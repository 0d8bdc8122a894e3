"""Euclidean projection of rows onto the probability simplex (``--project_l1``)."""
from __future__ import annotations

from typing import Optional

import torch


def project_to_simplex(v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project every row (last axis) of ``v`` onto ``{w >= 0, sum w = 1}`` (sort-based, Duchi et al. 2008).

    Masked entries (``mask`` False) are excluded: they come out exactly zero and the rest sums to 1.
    """
    if mask is not None:
        # Anything below max - 1 is projected to zero, so a finite fill keeps gradients finite.
        fill = v.detach().masked_fill(~mask, float("-inf")).amax(-1, keepdim=True).nan_to_num(neginf=0.0) - 2.0
        v = torch.where(mask, v, fill)
    u, _ = torch.sort(v, dim=-1, descending=True)
    cssv = u.cumsum(-1) - 1
    ind = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = (u - cssv / ind) > 0
    rho = support.sum(-1, keepdim=True).clamp_min(1)
    theta = cssv.gather(-1, rho - 1) / rho.to(v.dtype)
    w = (v - theta).clamp_min(0)
    if mask is not None:
        w = w * mask.to(w.dtype)
    return w
