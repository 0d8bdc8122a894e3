"""FLOP counts of KArAt models, one formula per KArAt core call, whichever impl serves it and whichever counter asks.

The convention is the paper's (spec section 4), in fvcore's multiply-adds: per KArAt head, ``q k^T`` and
``sigma(S) V`` as the matmuls they are, and the operator as ``N_q N r (3G + 1)`` for the Fourier basis (2G
coefficient products and G frequency products per edge, plus the rank-r projection); per softmax head (mixed
heads), ``q k^T``, ``attn V`` and the softmax as thop counts it (``3n - 1`` per row of ``n``), which is what the
paper's softmax totals hold. :func:`core_call_macs` is that formula; it is the same for the reference, efficient
and fused paths, because it counts the function, not the path that evaluates it.

The counters users run are jit-trace, op-by-op counters: fvcore's ``FlopCountAnalysis`` (detectron2's
``tools/analyze_model.py --tasks flop``) and mmengine's ``FlopAnalyzer`` (mmseg's
``tools/analysis_tools/get_flops.py``). Op by op, KArAt is invisible to them: custom autograd functions
(``prim::PythonOp._ReduceKeysFromQK``), Triton kernels and the Fourier basis' ``cos`` / ``sin`` count as zero,
and the efficient path's matmuls are not the reference path's. So while such a counter traces a model (its
``ScopePushHook`` sits on the module), each ``KArAtCore`` call is recorded as one op,
``prim::PythonOp.KArAtCall`` (:func:`trace_core_call`), which computes the same output by the usual path and
carries its cost; :func:`karat_call_flop_jit` is that op's handle. :data:`FLOP_HANDLES` / :data:`ACTIVATION_HANDLES`
register it with any fvcore-style counter (``detectron2_plugin.flops``, ``mmseg_configs.flops`` do so for the hosts'
tools); :func:`count_flops` (``tools/flops.py``) uses it with fvcore plus the softmax handles above.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .operator import KArAtOperator
from .resample import TokenLayout

KARAT_CALL = "prim::PythonOp.KArAtCall"


def operator_macs(op: KArAtOperator, logits_shape) -> int:
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


def _softmax_ops(rows: int, n: int) -> int:
    """A softmax over ``n`` entries as thop counts it: ``n`` exponentials, ``n - 1`` additions, ``n`` divisions.
    fvcore ignores it; the paper's softmax totals include it (they are fvcore's count plus this, to 0.004)."""
    return rows * (3 * n - 1)


def core_call_macs(core: nn.Module, q_shape, k_shape, v_shape) -> Counter:
    """Multiply-adds of one ``KArAtCore`` call on ``q, k, v`` of these shapes (``(B, H, N, d)``), all heads:
    ``karat_operator`` (the KArAt operators) and ``karat_attention`` (everything else: ``q k^T`` and ``sigma V``
    of the KArAt heads, the softmax heads' attention)."""
    b, heads, nq, d = (int(x) for x in q_shape)
    n, dv = int(k_shape[-2]), int(v_shape[-1])
    h = core.num_karat_heads
    soft_rows = b * (heads - h) * nq
    attention = b * h * nq * n * (d + dv) + soft_rows * n * (d + dv) + (_softmax_ops(soft_rows, n) if soft_rows else 0)
    return Counter(karat_attention=attention, karat_operator=operator_macs(core.operator, (b, h, nq, n)))


class CallCost(Counter):
    """The multiply-adds of one traced ``KArAtCore`` call, carried as a scalar argument of its trace node."""


class KArAtCall(torch.autograd.Function):
    """One ``KArAtCore`` call as a single trace node. The core computes as usual inside; a jit trace records a
    custom function as one ``prim::PythonOp`` without its body, so the counter sees this node and its cost."""

    @staticmethod
    def forward(ctx, q, k, v, bias, key_mask, scale, layout, core, cost):
        # the body is computed, not traced: a traced body would hold the core's parameters as constants
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return core.forward(q, k, v, bias=bias, key_mask=key_mask, scale=scale, layout=layout)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("KArAtCall is recorded only while a FLOP counter traces the model; it has no backward")


def _scope_hooks(module: nn.Module) -> List:
    """The scope hooks fvcore's and mmengine's analyses put on every module while they trace it."""
    return [h for h in module._forward_pre_hooks.values() if type(h).__name__ == "ScopePushHook"]


def _mark_submodules_called(core: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The core's submodules run inside the one traced node, so the counter would report them as "never called";
    a free op (``aten::view``, which both counters ignore) on the output in each one's scope says they were
    (their cost is in the core's node). On the output's path, so that the trace keeps it."""
    state = torch._C._get_tracing_state()
    for mod in core.modules():
        for hook in (_scope_hooks(mod) if mod is not core else []):
            state.push_scope(hook.name)
            out = out.view(out.shape)
            state.pop_scope()
    return out


def trace_core_call(core: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    bias: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
                    scale: Optional[float], layout: Optional[TokenLayout] = None) -> Optional[torch.Tensor]:
    """``KArAtCore.forward`` as one ``KArAtCall`` node while a FLOP counter traces it, else None (go on as usual).

    Other jit traces (exports) are left exactly as they were."""
    if not torch.jit.is_tracing() or not _scope_hooks(core):
        return None
    cost = CallCost(core_call_macs(core, q.shape, k.shape, v.shape))
    # counting is forward only: detached inputs keep autograd (and with it the tracer) off the untraced body
    q, k, v, bias = (None if t is None else t.detach() for t in (q, k, v, bias))
    return _mark_submodules_called(core, KArAtCall.apply(q, k, v, bias, key_mask, scale, layout, core, cost))


def karat_call_flop_jit(inputs: List, outputs: List) -> Counter:
    """fvcore / mmengine handle of ``prim::PythonOp.KArAtCall``: the call's multiply-adds, by part."""
    node = outputs[0].node()
    return Counter(next(a for a in node.scalar_args() if isinstance(a, CallCost)))


def karat_call_activation_jit(inputs: List, outputs: List) -> int:
    """Activation-count handle: the call's output elements (what fvcore counts for a matmul or a linear)."""
    return math.prod(outputs[0].type().sizes())


FLOP_HANDLES = {KARAT_CALL: karat_call_flop_jit}
ACTIVATION_HANDLES = {KARAT_CALL: karat_call_activation_jit}


def register(table: Dict, handles: Dict) -> None:
    """Add ``handles`` to a counter's default op table (fvcore's ``_DEFAULT_SUPPORTED_OPS``, mmengine's
    ``_DEFAULT_SUPPORTED_FLOP_OPS``...), which every analyzer copies when it is created; idempotent."""
    table.update(handles)


def _softmax_flop_jit(inputs, outputs) -> int:
    shape = outputs[0].type().sizes()
    dim = inputs[1].toIValue() if hasattr(inputs[1], "toIValue") else -1
    n = shape[dim]
    return _softmax_ops(math.prod(shape) // n, n)


def _sdpa_flop_jit(inputs, outputs) -> int:
    """``scaled_dot_product_attention`` as what it replaces: ``q k^T``, the softmax and ``attn v``."""
    q, k, v = (inputs[i].type().sizes() for i in range(3))
    *batch, nq, d = q
    nk, dv = k[-2], v[-1]
    rows = math.prod(batch) * nq
    return rows * nk * (d + dv) + _softmax_ops(rows, nk)


def count_flops(model: nn.Module, inputs) -> Dict[str, float]:
    """``{"total", "karat", "rest"}`` in GFLOPs (fvcore's multiply-adds) for one forward pass on ``inputs``;
    ``karat`` is the KArAt operators, ``rest`` everything else (the attention matmuls included)."""
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, inputs)
            analysis.set_op_handle(**FLOP_HANDLES)
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
            analysis.set_op_handle("aten::softmax", _softmax_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total = analysis.total()
            karat = analysis.by_operator().get("karat_operator", 0)
    finally:
        model.train(was_training)
    return dict(total=total / 1e9, karat=karat / 1e9, rest=(total - karat) / 1e9)
