"""The fused Triton path as two ``torch.library`` operators, so that ``torch.compile`` and CUDA graphs capture it.

``karat::fused_attention`` is the whole ``sigma(S) V = ((Phi(S) W^T) * mask) V`` of a ``phi1_w2`` operator: the
forward kernel for ``H = Phi(S)``, the coefficient scaling and the rank expansion ``H (W^T V)``. Its autograd
formula (:func:`_gradients`) calls ``karat::fused_attention_backward``: the dq and dk kernels and the gradients of
those few tensor ops, written out. For ``torch.compile`` each is one node in Dynamo's graph, and AOTAutograd
decomposes both (``torch.library.triton_op``) into their tensor ops and the Triton launches (``wrap_triton``), which
Inductor compiles with the rest of the step, and which a CUDA graph (``mode="reduce-overhead"``) replays. Their fake
implementations are their own bodies run on fake tensors, so output shapes, dtypes and strides are exact. An eager
call runs the same bodies and formula as one ``autograd.Function`` node (:class:`_Eager`), without the operator
dispatch; :func:`attention` picks.

Nothing in the operators syncs with the host, reads a tensor's value, or picks a branch from one: every decision
is made from shapes, dtypes and flags. Whether the kernels build on this device is settled before any tracing
(:func:`builds`, a constant for ``torch.compile``): once per variant, a tiny forward and backward run eagerly; if
they fail, the fused kernels are disabled for the process and ``karat.kernels.choose`` takes the efficient path,
so no fallback ever runs inside a compiled graph or a CUDA-graph capture.

Under ``TRITON_INTERPRET=1`` (Triton on CPU tensors, for tests) the operators are opaque ``custom_op`` s instead:
Inductor cannot generate code for interpreted kernels, but a compiled graph can call the operators, so a compiled
training step runs the real kernels on the CPU.

``karat.kernels.fused_window`` registers its pair (``karat::window_attention`` and its backward) the same way: its
launches written ``fused_triton._launch(kernel)[grid](...)``; a forward body and a backward body taking tensors and
numbers only, each passed to :func:`define` with the kernels it launches; the formula registered with
``register_autograd``; an eager ``autograd.Function`` over the same bodies, chosen where :func:`_tracing` is False;
and its tiny run in :data:`PROBES`, so that :func:`builds` settles whether its kernels work before its path is
chosen.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import sys

import torch
from torch import Tensor

from . import efficient
from . import fused_triton as ft

_BUILDS: Dict[Tuple, bool] = {}


def define(name: str, fn: Callable, kernels: Sequence[Any]) -> "torch._library.custom_ops.CustomOpDef":
    """``fn`` (tensor ops and ``_launch``-ed Triton kernels, no host sync) as the operator ``name``: a
    ``triton_op`` that ``torch.compile`` traces into; under the Triton interpreter (or before torch 2.6, which has no
    ``triton_op``) an opaque ``custom_op`` whose fake implementation is ``fn`` itself (``_launch`` skips the launches
    on fake tensors).

    ``kernels`` are the Triton kernels ``fn`` launches: torch finds them by reading ``fn``'s source, which misses
    launches made through helpers, and keys its compiled-graph cache on their source, so that an edited kernel is
    not served from a stale cache entry."""
    if ft._interpreting() or ft.wrap_triton is None:
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op
    op = torch.library.triton_op(name, fn, mutates_args=())
    from torch._library import triton as library_triton

    table = getattr(library_triton, "triton_ops_to_kernels", None)
    if table is not None:
        table[name] = list(kernels)
    return op


def _coef(coefficients: Tensor, basis_scale: Tensor, base_weight: Optional[Tensor]) -> Tensor:
    """The kernels' coefficients, (H, N, r, M (+1)) fp32: the basis coefficients times their scale, and the base
    function's weight as one more feature."""
    coef = coefficients.float() * basis_scale.float().unsqueeze(-1)  # read by the kernels through its strides
    return coef if base_weight is None else torch.cat([coef, base_weight.float().unsqueeze(-1)], dim=-1)


def _fused_attention(q: Tensor, k: Tensor, v: Tensor, coefficients: Tensor, basis_scale: Tensor,
                     base_weight: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], rel_h: Optional[Tensor],
                     rel_w: Optional[Tensor], mask: Optional[Tensor], grid: int, scale: float, lo: float,
                     inv_h: float, spline: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, H, U or sigma, coef): ``out = sigma(S) V`` in fp32, and what the backward needs.

    q, k, v: (B, H, N, d), any strides with a contiguous last dim (q, k are read in place); coefficients
    (H, N, r, M), basis_scale / base_weight / weight (H, N, r); bias: fp32 broadcastable to (B, H, N, N);
    rel_h / rel_w: contiguous fp32 (B, H, N, k_h / k_w); mask: bool, (.., 1, N) for padding or (.., N, N)."""
    q, k = ft._rowwise(q), ft._rowwise(k)
    coef = _coef(coefficients, basis_scale, base_weight)
    ex = ft._Extras(q, bias, rel_h, rel_w, mask, None, grid, (lo, inv_h, spline, base_weight is not None))
    hidden = ft._phi_forward(q, k, coef, ex, grid, scale)
    if efficient._is_key_level(mask):  # H (W^T V): linear in N
        u = weight.float().transpose(-1, -2) @ efficient._masked_rows(v.float(), mask)  # (B, H, r, d)
        return hidden @ u, hidden, u, coef
    sigma = (hidden @ weight.float().transpose(-1, -2)) * mask  # a per-query mask (shifted windows): N x N
    return sigma @ v.float(), hidden, sigma, coef


def _gradients_of(g: Tensor, q: Tensor, k: Tensor, v: Tensor, coefficients: Tensor, basis_scale: Tensor, coef: Tensor,
                  weight: Tensor, hidden: Tensor, saved: Tensor, bias: Optional[Tensor], rel_h: Optional[Tensor],
                  rel_w: Optional[Tensor], mask: Optional[Tensor], grid: int, scale: float, lo: float, inv_h: float,
                  spline: int, has_base: bool, need_bias: bool) -> List[Optional[Tensor]]:
    """[dq, dk, dv, dcoefficients, dbasis_scale, dbase_weight, dweight, dbias, drel_h, drel_w], fp32; None for an
    absent input (no base, no bias or ``need_bias`` False, no decomposed bias)."""
    q, k = ft._rowwise(q), ft._rowwise(k)
    g, weight = g.float(), weight.float()
    if efficient._is_key_level(mask):
        vm, u = efficient._masked_rows(v.float(), mask), saved
        dh = (g @ u.transpose(-1, -2)).contiguous()
        du = hidden.transpose(-1, -2) @ g  # (B, H, r, d)
        dv = efficient._masked_rows(weight @ du, mask)
        dw = (vm @ du.transpose(-1, -2)).sum(0)
    else:
        sigma = saved
        dsigma = (g @ v.float().transpose(-1, -2)) * mask
        dh = (dsigma @ weight).contiguous()
        dv = sigma.transpose(-1, -2) @ g
        dw = (dsigma.transpose(-1, -2) @ hidden).sum(0)
    ex = ft._Extras(q, bias, rel_h, rel_w, mask, None, grid, (lo, inv_h, spline, has_base))
    dq, dk, dc, db, drh, drw = ft._phi_backward(q, k, coef, bias, rel_h, rel_w, ex, grid, scale, dh, need_bias)
    m = coefficients.shape[-1]
    dc_basis = dc[..., :m]  # (H, N, r, M), the coefficients' layout
    dcoefficients = dc_basis * basis_scale.float().unsqueeze(-1)
    dscale = (dc_basis * coefficients.float()).sum(-1)
    return [dq, dk, dv, dcoefficients, dscale, dc[..., m].clone() if has_base else None, dw, db, drh, drw]


def _fused_attention_backward(g: Tensor, q: Tensor, k: Tensor, v: Tensor, coefficients: Tensor, basis_scale: Tensor,
                              coef: Tensor, weight: Tensor, hidden: Tensor, saved: Tensor, bias: Optional[Tensor],
                              rel_h: Optional[Tensor], rel_w: Optional[Tensor], mask: Optional[Tensor], grid: int,
                              scale: float, lo: float, inv_h: float, spline: int, has_base: bool,
                              need_bias: bool) -> List[Tensor]:
    """:func:`_gradients_of` as an operator's outputs: an empty tensor for an absent gradient."""
    grads = _gradients_of(g, q, k, v, coefficients, basis_scale, coef, weight, hidden, saved, bias, rel_h, rel_w,
                          mask, grid, scale, lo, inv_h, spline, has_base, need_bias)
    # one new tensor per absent gradient: an operator's outputs must not alias each other
    return [q.new_empty(0, dtype=torch.float32) if t is None else t for t in grads]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, coefficients, basis_scale, base_weight, weight, bias, rel_h, rel_w, mask, *args = inputs
    _, hidden, saved, coef = output
    ctx.save_for_backward(q, k, v, coefficients, basis_scale, coef, weight, hidden, saved, bias, rel_h, rel_w, mask)
    ctx.args = (*args, base_weight is not None)
    ctx.mark_non_differentiable(hidden, saved, coef)
    ctx.set_materialize_grads(False)  # no zeros for the gradients of those three


def _gradients(ctx, g: Tensor, backward: Callable) -> tuple:
    """The autograd formula of ``karat::fused_attention``: ``backward`` (the backward operator, or its body in eager
    mode) on what the forward saved; None for an input that gets no gradient."""
    q, k, v, coefficients, basis_scale, coef, weight, hidden, saved, bias, rel_h, rel_w, mask = ctx.saved_tensors
    need_bias = bias is not None and ctx.needs_input_grad[7]
    grads = backward(g, q, k, v, coefficients, basis_scale, coef, weight, hidden, saved, bias, rel_h, rel_w, mask,
                     *ctx.args, need_bias)
    present = (True, True, True, True, True, ctx.args[-1], True, need_bias, rel_h is not None, rel_w is not None)
    return (*(t if keep else None for t, keep in zip(grads, present)), *(None,) * 6)  # mask, then constants


if ft.triton is not None:
    fused_attention = define("karat::fused_attention", _fused_attention, [ft._phi_fwd_kernel])
    fused_attention_backward = define("karat::fused_attention_backward", _fused_attention_backward,
                                      [ft._phi_bwd_dq_kernel, ft._phi_bwd_dk_kernel])
    fused_attention.register_autograd(lambda ctx, g, *_: _gradients(ctx, g, fused_attention_backward),
                                      setup_context=_setup_context)


def _direct_launches():
    """Triton launches straight to Triton, as in the operators' own eager calls (``wrap_triton`` would go through
    a higher-order op, about a millisecond per launch)."""
    import contextlib

    from torch._library import triton as library_triton

    return getattr(library_triton, "set_wrap_triton_enabled", lambda _: contextlib.nullcontext())(False)


class _Eager(torch.autograd.Function):
    """The operators' bodies and autograd formula without the operator dispatch: what an eager call runs. The
    ``torch.library`` dispatch of the pair (Python kernels behind the dispatcher, a generated autograd function)
    costs host time on every call, which an eager GPU step at ViT-Tiny widths waits for (``tools/host_ops.py``)."""

    @staticmethod
    def forward(ctx, *inputs):
        with _direct_launches():
            output = _fused_attention(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, *_):
        with _direct_launches():
            return _gradients(ctx, g, _gradients_of)


def _tracing() -> bool:
    """Whether a compiler or tracer is watching: Dynamo or export, or a fake, proxy (``make_fx``) or
    functionalization mode."""
    keys = torch._C._TorchDispatchModeKey
    return torch.compiler.is_compiling() or any(torch._C._get_dispatch_mode(key) is not None
                                                for key in (keys.FAKE, keys.PROXY, keys.FUNCTIONAL))


def attention(*inputs) -> Tensor:
    """``sigma(S) V`` (fp32) by the fused kernels, the arguments of ``karat::fused_attention``: that operator where
    it is traced (:func:`_tracing`), else the same bodies without the dispatch (:class:`_Eager`)."""
    if _tracing():
        return fused_attention(*inputs)[0]
    return _Eager.apply(*inputs)[0]


def variant(family: str, op, q: Tensor, bias, key_mask: Optional[Tensor], tokens: int = 16) -> Tuple:
    """What decides which kernels of ``family`` (a key of :data:`PROBES`) a call compiles, as constants: device,
    dtype, sizes, flags, and the keys a probe holds (``tokens``: where the kernels' tile depends on them)."""
    basis = op.phi.basis
    _, _, spline, _ = ft._basis_args(op.phi, op.cfg.grid)
    rel = isinstance(bias, ft.DecomposedRelPos)
    return (family, str(q.device), str(q.dtype).split(".")[-1], q.shape[-1], op.cfg.grid, basis.coefficients.shape[2],
            basis.coefficients.shape[3], op.phi.has_base, spline,
            "rel" if rel else None if bias is None else "dense",
            *((bias.rel_h.shape[-1], bias.rel_w.shape[-1]) if rel else (1, 1)),
            None if key_mask is None else "key" if efficient._is_key_level(key_mask) else "query", tokens)


@torch.compiler.assume_constant_result
def builds(key: Tuple) -> bool:
    """Whether the kernels of this :func:`variant` build and run here: a tiny forward and backward, run eagerly once
    per variant and process (``torch.compile`` calls this while it traces and keeps the answer). On failure that
    family's kernels are disabled (one warning) and its calls take another path."""
    if key not in _BUILDS:
        _BUILDS[key] = _probe(*key)
    return _BUILDS[key]


def _run_flash(q: Tensor, coefficients: Tensor, ones: Tensor, base: Optional[Tensor], bias: Optional[Tensor],
               rel_h: Optional[Tensor], rel_w: Optional[Tensor], mask: Optional[Tensor], args: tuple) -> None:
    out, hidden, saved, coef = fused_attention(q, q, q, coefficients, ones, base, ones, bias, rel_h, rel_w, mask,
                                               *args)
    fused_attention_backward(out, q, q, q, coefficients, ones, coef, ones, hidden, saved, bias, rel_h, rel_w, mask,
                             *args, base is not None, bias is not None)


# kernel family -> (a tiny forward and backward through its operators, what turns the family off). A kernel module
# adds its own entry when it loads (karat.kernels.fused_window).
PROBES: Dict[str, Tuple[Callable[..., None], Callable[[str], None]]] = {"flash": (_run_flash, ft.disable)}


def _probe(family: str, device: str, dtype: str, d: int, grid: int, rank: int, features: int, has_base: bool,
           spline: int, bias: Optional[str], kh: int, kw: int, mask: Optional[str], tokens: int) -> bool:
    run, disable = PROBES[family]
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return True  # traced with fake CUDA tensors on a machine without a GPU: there is nothing to run
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        with unset_fake_temporarily(), torch.no_grad():
            n = kh * kw if bias == "rel" else tokens
            # constants, not random draws: the check must not move the caller's random stream
            q = torch.full((1, 1, n, d), 0.1, device=dev, dtype=getattr(torch, dtype))
            coefficients = torch.full((1, n, rank, features), 0.1, device=dev)
            ones = torch.ones(1, n, rank, device=dev)
            dense = torch.zeros(1, 1, n, n, device=dev) if bias == "dense" else None
            rel_h, rel_w = ((torch.zeros(1, 1, n, kh, device=dev), torch.zeros(1, 1, n, kw, device=dev))
                            if bias == "rel" else (None, None))
            keep = (None if mask is None else
                    torch.ones(1, 1, 1 if mask == "key" else n, n, dtype=torch.bool, device=dev))
            run(q, coefficients, ones, ones if has_base else None, dense, rel_h, rel_w, keep,
                (grid, 1.0, 0.0, 1.0, spline))
            if dev.type == "cuda" and not torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize(dev)  # a failed launch shows here, not in a later call
        return True
    except Exception as e:  # noqa: BLE001  a kernel that fails to build must not end the run
        disable(f"{type(e).__name__}: {e}")
        return False


ft.fused_ops = sys.modules[__name__]  # fused_triton's supports() and attend() call this module's operators
