"""Mixed precision: where KArAt computes in fp32 and what dtype it hands back.

The bases lose their shape or overflow in half precision (``cos(kS)`` of a bf16 logit, ``x^5`` in fp16), and
the efficient paths sum over every key. So KArAt evaluates its operator in fp32 (float64 stays float64) with
autocast switched off, whatever the autocast state or the parameters' dtype (``model.bfloat16()``), and returns
the attention output in the dtype the host expects: the autocast dtype under autocast, as
``F.scaled_dot_product_attention`` does, else the input's dtype.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Optional, TypeVar

import torch

HALF = (torch.float16, torch.bfloat16)
F = TypeVar("F", bound=Callable)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype computes in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upcast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` in its compute dtype (a no-op for fp32 and float64 tensors, and for None and bool masks)."""
    if t is None or not t.is_floating_point():
        return t
    return t.to(compute_dtype(t))


def autocast_off(device_type: str) -> ContextManager:
    """Switch autocast off for ``device_type`` where it is on (a no-op elsewhere)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def output_dtype(t: torch.Tensor) -> torch.dtype:
    """What an attention output for input ``t`` should be: the autocast dtype where autocast is on for
    ``t``'s device (as SDPA does), else ``t``'s own dtype. float64 is never lowered."""
    kind = t.device.type
    if t.dtype in (torch.float32, *HALF) and torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def full_precision(fn: F) -> F:
    """Run ``fn(self, x, ...)`` with ``x`` upcast and autocast off; its result comes back in ``x``'s dtype."""

    @functools.wraps(fn)
    def wrapper(self, x: torch.Tensor, *args, **kwargs):
        with autocast_off(x.device.type):
            return fn(self, upcast(x), *args, **kwargs).to(x.dtype)

    return wrapper  # type: ignore[return-value]


def full_precision_attention(fn: F) -> F:
    """Run ``fn(op, q, k, v, bias, key_mask, ...)`` on upcast ``q, k, v, bias`` with autocast off, and return its
    output in :func:`output_dtype` of ``q``."""

    @functools.wraps(fn)
    def wrapper(op, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
                key_mask: Optional[torch.Tensor] = None, *args, **kwargs):
        dtype = output_dtype(q)
        with autocast_off(q.device.type):
            bias = bias.to(compute_dtype(bias.rel_h)) if hasattr(bias, "rel_h") else upcast(bias)  # DecomposedRelPos
            return fn(op, upcast(q), upcast(k), upcast(v), bias, key_mask, *args, **kwargs).to(dtype)

    return wrapper  # type: ignore[return-value]
