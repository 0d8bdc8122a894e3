"""FLOP counts of KArAt models with fvcore, in the paper's convention.

fvcore counts multiply-adds of matmuls, linears, convolutions and norms and ignores elementwise functions;
softmax is added as thop counts it (``3n - 1`` operations per row of ``n``), which is what the paper's softmax
totals hold.
For the KArAt operator the paper counts ``N_q * N * r * (3G + 1)`` per head for the Fourier basis (spec
section 4): 2G coefficient products and G frequency products per edge, plus the rank-r projection. The
model is traced on the reference path (``q k^T`` and ``sigma(S) V`` are counted as the matmuls they are);
the operator's own einsums are replaced by that count, through a forward hook on each operator.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterator, List

import torch
import torch.nn as nn

from .attention import KArAtCore
from .operator import KArAtOperator


def operator_macs(op: KArAtOperator, logits_shape: torch.Size) -> int:
    """Multiply-adds of one operator call on logits of shape ``(B, H, N_q, N)`` (the paper's convention)."""
    b, h, nq, n = (int(x) for x in logits_shape)
    cfg = op.cfg
    if cfg.basis_type == "FourierBasis":
        per_edge = 3 * cfg.grid + 1
    else:  # one product per basis function and edge, plus the projection
        per_edge = {"SplineBasis": cfg.grid + cfg.order, "WaveletBasis": 1,
                    "RationalBasis": sum(cfg.rational_order) + 1}[cfg.basis_type] + 1
    if op.mode == "depth":
        return b * h * nq * n * cfg.hidden_dim * per_edge * len(op.layers)
    return b * h * nq * n * cfg.hidden_dim * per_edge


@contextmanager
def _counting(model: nn.Module) -> Iterator[List[int]]:
    """Reference path everywhere, and a list that collects every operator call's multiply-adds."""
    calls: List[int] = []
    cores = [m for m in model.modules() if isinstance(m, KArAtCore)]
    saved = [c.cfg for c in cores]
    hooks = [op.register_forward_hook(lambda mod, args, out: calls.append(operator_macs(mod, args[0].shape)))
             for op in {id(m): m for m in model.modules() if isinstance(m, KArAtOperator)}.values()]
    for c in cores:
        c.cfg = c.cfg.replace(impl="reference")
    try:
        yield calls
    finally:
        for c, cfg in zip(cores, saved):
            c.cfg = cfg
        for hk in hooks:
            hk.remove()


def _softmax_ops(rows: int, n: int) -> int:
    """A softmax over ``n`` entries as thop counts it: ``n`` exponentials, ``n - 1`` additions, ``n`` divisions.
    fvcore ignores it; the paper's softmax totals include it (they are fvcore's count plus this, to 0.004)."""
    return rows * (3 * n - 1)


def _softmax_flop_jit(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    shape = get_shape(outputs[0])
    dim = inputs[1].toIValue() if hasattr(inputs[1], "toIValue") else -1
    n = shape[dim]
    return _softmax_ops(math.prod(shape) // n, n)


def _sdpa_flop_jit(inputs, outputs) -> int:
    """``scaled_dot_product_attention`` as what it replaces: ``q k^T``, the softmax and ``attn v``."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    *batch, nq, d = q
    nk = k[-2]
    dv = get_shape(inputs[2])[-1]
    rows = math.prod(batch) * nq
    return rows * nk * (d + dv) + _softmax_ops(rows, nk)


def count_flops(model: nn.Module, inputs: torch.Tensor) -> Dict[str, float]:
    """``{"total", "karat", "rest"}`` in GFLOPs (fvcore's multiply-adds) for one forward pass on ``inputs``."""
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        with _counting(model) as calls, torch.no_grad():
            analysis = FlopCountAnalysis(model, inputs)
            # only the operators use einsum here; their cost comes from the hooks (a None handle is not honoured
            # by every fvcore release, a zero handle is)
            analysis.set_op_handle("aten::einsum", lambda inputs, outputs: 0)
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
            analysis.set_op_handle("aten::softmax", _softmax_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            rest = analysis.total()
            karat = sum(calls)  # fvcore traces one forward pass: each operator call is recorded once
    finally:
        model.train(was_training)
    return dict(total=(rest + karat) / 1e9, karat=karat / 1e9, rest=rest / 1e9)
