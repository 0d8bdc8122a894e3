"""Where ``sigma(S) V`` is evaluated: the evaluation paths behind one dispatch (spec section 5).

=============  ==========================================================================================
path           what it is
=============  ==========================================================================================
``fused``      Triton kernels on CUDA: windows of at most 64 keys one per tile (``fused_window``, softmax's memory),
               longer rows flash-style (``fused_triton``); tiles of ``S`` and their features stay in registers
``efficient``  blockwise over keys, ``sigma(S)`` never materialised (``efficient``); on the CPU its Fourier key
               reduction runs the C++ kernel (``fused_cpu``) where that applies
``reference``  ``sigma(S)`` materialised (``reference``): the oracle, and what attention maps and dropout need
=============  ==========================================================================================

Every path module has ``supports(...) -> Optional[str]`` (None: it can serve the call, else the one-line reason)
and ``attend(op, q, k, v, bias, key_mask, scale)``. :func:`choose` is the one place that turns ``cfg.impl``
(``auto | reference | efficient | fused``) and a call into a path; ``KArAtCore`` and the benchmark use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ..operator import KArAtOperator
from ..relpos import Bias, dense_bias
from . import efficient, fused_ops, fused_triton, fused_window, onnx_export, reference  # fused_ops registers the ops

PATHS = ("fused", "efficient", "reference")

# Up to this many keys ``auto`` materialises sigma(S) rather than take the path named (by ``Choice.detail``): an
# N x N matrix this small costs less than blocking and recomputation (spec section 5: small windows such as
# Swin's 49 tokens). Measured on the CPU (benchmarks/README.md, "Small windows"): the C++ kernel ties the
# reference at about 26 keys and wins from there on, in time and memory; the PyTorch blockwise path from about 64.
# On CUDA the Triton kernels serve every size (0): windows of at most 64 keys by the whole-window kernels, which
# keep softmax's memory (the materialised sigma(S) cost a Swin-T 1.78x softmax's on an H100). That is the memory
# promise; the speed crossover against the reference path is settled by the next GPU run (the GPU suite's host
# table runs Swin both ways).
REFERENCE_MAX_TOKENS: Dict[str, int] = {fused_window.DETAIL: 0, "triton": 0, "C++ CPU kernel": 24,
                                        "PyTorch, blockwise": 64}


@dataclass(frozen=True)
class Choice:
    """The path that serves a call, how (``detail``), and why each faster path was passed over."""

    path: str
    detail: str = ""
    passed_over: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return self.path + (f" ({self.detail})" if self.detail else "")


def choose(op: KArAtOperator, impl: str, q: Optional[torch.Tensor] = None, bias: Optional[Bias] = None,
           key_mask: Optional[torch.Tensor] = None, needs_sigma: Optional[str] = None) -> Choice:
    """The path for ``impl`` and this call.

    ``auto`` takes the fused kernels on CUDA where they apply, else the efficient path, unless the matrix is
    small (at most ``REFERENCE_MAX_TOKENS[path]`` keys) or the operator or the caller needs ``sigma(S)`` itself
    (``needs_sigma`` says why: attention-map export, attention dropout). An explicit impl that cannot serve the
    call raises ``ValueError`` with the reason. While ``torch.onnx.export`` runs, ``auto``, ``efficient`` and
    ``fused`` take the blockwise PyTorch path at every size (``karat.kernels.onnx_export``)."""
    reason = efficient.supports(op) or needs_sigma
    if impl in ("efficient", "fused") and reason is not None:
        raise ValueError(f"impl='{impl}' cannot serve this configuration: {reason}. "
                         f"Use impl='auto' (falls back to the reference path) or impl='reference'.")
    if impl == "reference":
        return Choice("reference")
    if reason is not None:
        return Choice("reference", passed_over={"efficient": reason})
    if onnx_export.exporting():  # no custom op or Triton kernel in an ONNX graph, no N x N x 2G features either
        return Choice("efficient", "PyTorch, blockwise (ONNX export)")
    choice = _fastest(op, impl, q, bias, key_mask)
    most = REFERENCE_MAX_TOKENS.get(choice.detail, 0)
    if impl == "auto" and op.num_tokens <= most:
        why = f"{op.num_tokens} keys <= {most}: sigma(S) is cheaper to materialise"
        return Choice("reference", passed_over={**choice.passed_over, choice.path: why})
    return choice


def _fastest(op: KArAtOperator, impl: str, q: Optional[torch.Tensor], bias: Optional[Bias],
             key_mask: Optional[torch.Tensor]) -> Choice:
    """The fused kernels where ``impl`` asks for them or (``auto``) they serve this CUDA call (whole windows up to
    ``fused_window.MAX_TOKENS`` keys, else flash-style), else the efficient path."""
    passed: Dict[str, str] = {}
    if impl == "fused" or (impl == "auto" and q is not None and q.is_cuda):
        if q is not None and fused_window.supports(op, q, bias, key_mask) is None:
            return Choice("fused", fused_window.DETAIL)
        why_not = fused_triton.supports(op, q, bias, key_mask) if q is not None else "no input given"
        if why_not is None:
            return Choice("fused", "triton")
        if impl == "fused":
            raise ValueError(f"impl='fused' cannot serve this call: {why_not}. Use impl='auto' or 'efficient'.")
        passed["fused"] = why_not
    return Choice("efficient", efficient.detail(op, q, dense_bias(bias), key_mask), passed)


def attend(choice: Choice, op: KArAtOperator, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           bias: Optional[Bias], key_mask: Optional[torch.Tensor], scale: float,
           strict: bool = False) -> torch.Tensor:
    """``sigma(S) V`` by the chosen (non-reference) path. A fused kernel that fails to build falls back to the
    efficient path (and stays off in this process: the whole-window kernels alone where they failed, so that small
    windows take the flash kernels next) unless ``strict`` (the user asked for ``impl='fused'``)."""
    if choice.path == "fused":
        fused = fused_window if choice.detail == fused_window.DETAIL else fused_triton
        try:
            return fused.attend(op, q, k, v, bias, key_mask, scale)
        except Exception as e:  # a kernel that fails to build here must not take `auto` users down
            if strict:
                raise
            fused.disable(f"{type(e).__name__}: {e}")
    if choice.path == "reference":
        return reference.attend(op, q, k, v, dense_bias(bias), key_mask, scale)
    # an exported graph adds a decomposed bias block by block (karat.kernels.onnx_export), never as N x N
    return efficient.attend(op, q, k, v, bias if onnx_export.exporting() else dense_bias(bias), key_mask, scale)


__all__ = ["Choice", "PATHS", "REFERENCE_MAX_TOKENS", "attend", "choose", "efficient", "fused_ops", "fused_triton",
           "fused_window", "onnx_export", "reference"]
