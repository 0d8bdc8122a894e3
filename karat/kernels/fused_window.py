"""Fused Triton kernels for ``phi1_w2`` over small windows (at most 64 keys): one program holds a whole window.

Swin's 49-token windows are too small for the flash-style kernels of :mod:`karat.kernels.fused_triton` to pay
(their autograd node keeps ``Phi(S)`` and, for a per-query mask, the N x N ``sigma(S)``), and materialising
``sigma(S)`` costs 1.78x softmax's memory on a Swin-T. Here every ``(window, head)`` pair fits one tile: ``S``
(N x N, padded to a power of two of at least 16), its features, ``H = Phi(S)`` (N x r),
``sigma = (H W^T) * mask`` and ``out = sigma V`` are all computed in registers, and the forward writes ``out``
only. So the autograd node saves its inputs and nothing else, as softmax attention does.

* forward: one program per (group of windows, head) loops over its windows: the head's coefficient and rank
  weight tiles stay in cache, and a launch covers every window and head with a small grid;
* backward: one kernel, the same grid. Per window it recomputes ``S`` and its features and writes ``dq``, ``dk``,
  ``dv`` (``dk``, ``dv`` summed over the window's query blocks in registers); the coefficient, rank-weight and
  (broadcast) bias gradients are summed over the program's windows and written as per-program partials, summed
  afterwards in PyTorch: deterministic, no atomics. The order inside a query block needs no split (``dsigma =
  (dO V^T) * mask`` first, then ``dH = dsigma W``, then one pass over the features for ``H``, ``dS`` and the
  coefficient gradient).

It serves what :mod:`karat.kernels.fused_triton` serves (Fourier by the angle-addition recurrence, B-splines,
the SiLU base function, a dense bias broadcastable to ``(B, H, N, N)`` with its gradient, boolean key-padding and
per-query masks such as Swin's shifted windows, fp32 / bf16 / fp16 ``q, k, v`` read in place through their
strides) at N <= 64 and head_dim <= 128, reusing its Triton helpers (``_logits``, ``_bspline``, ...). A ViTDet
decomposed bias is left to the flash kernels. :func:`supports` names what it cannot serve in one line. Tested with
``TRITON_INTERPRET=1`` (tests/test_fused_window.py) and compiled for sm_80 / sm_90 (tests/test_fused_compile.py).

Not yet run on a GPU. A program holds a window's keys whole and its query rows in blocks (:func:`launch_config`:
16 rows, with 8 warps for windows of 33-64 keys, unless a tuning run recorded another). ``python -m
tools.kernel_table --space`` compiles blocks of 16 and 32 rows on 4 and 8 warps for sm_80 and sm_90: 16 rows on 8
warps spill least in every shipped variant on both (the forward: nothing; the backward: 0.6-1.1 KB per thread, 6.3 KB
for Swin-T's on sm_80, see :data:`SPILL_BUDGET`).
Sine and cosine take the flash kernels' range reduction and the SFU (``_cos_sin``): libdevice's routines cost the
Fourier forward 12 warp instructions per logit, now 7.3.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..operator import KArAtOperator
from ..precision import autocast_off, output_dtype, upcast
from ..relpos import Bias, DecomposedRelPos
from . import fused_ops, fused_triton, reference
from .efficient import _sum_to
from .fused_ops import _coef
from .fused_triton import DOT_PRECISION, _basis_args, _dtype_name, _flag_names, _launch, _pad, _rowwise, triton

if triton is not None:
    import triton.language as tl

    from .fused_triton import _add_feature_grad, _bspline, _cols, _cos_sin, _logits, _rows

DETAIL = "triton, whole window"  # Choice.detail of this variant
MAX_TOKENS = 64  # keys one program holds
MAX_HEAD_DIM = 128  # q, k, v, dO tiles of 64 x 128 in fp32: beyond, the flash kernels serve
TARGET_PROGRAMS = 1024  # windows per program grow until a launch has about this many programs
STAGES = 1  # no software pipelining of the window loop: prefetched q, k, v and coefficient tiles overflow shared memory


_DISABLED: Optional[str] = None


def disable(reason: str) -> None:
    """Stop ``choose`` from taking the whole-window kernels in this process (after they failed to run, e.g. a GPU
    whose blocks have less shared memory than a 64-key window's backward takes); the flash kernels stay on."""
    global _DISABLED
    if _DISABLED is None:
        warnings.warn(f"KArAt whole-window kernels disabled, small windows take the flash-style kernels: {reason}")
    _DISABLED = reason


def supports(op: KArAtOperator, q: torch.Tensor, bias: Optional[Bias],
             key_mask: Optional[torch.Tensor]) -> Optional[str]:
    """None when the whole-window kernels can evaluate this call, else the reason (one line)."""
    if _DISABLED is not None:
        return f"the whole-window kernels failed earlier in this process ({_DISABLED})"
    why = fused_triton.unsupported(op, q, bias, key_mask)  # the limits both kernel families share
    if why is not None:
        return why
    if op.num_tokens > MAX_TOKENS:
        return f"{op.num_tokens} keys > {MAX_TOKENS}: a window must fit one tile"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if isinstance(bias, DecomposedRelPos):
        return "a decomposed relative-position bias runs in the flash kernels"
    # the tile is the padded window: one build check per size class, settled before any trace or capture
    if not fused_ops.builds(fused_ops.variant("window", op, q, bias, key_mask, _pad(op.num_tokens))):
        return f"the whole-window kernels failed to build in this process ({_DISABLED})"
    return None


def windows_per_program(pairs: int) -> int:
    """(window, head) pairs per program: 1 up to TARGET_PROGRAMS pairs, then enough for about that many programs
    (a run-time loop count, so no batch size compiles a new kernel)."""
    return max(1, min(64, pairs // TARGET_PROGRAMS))


# (query rows per block, warps) worth timing for both kernels, the default first: of these, 16 rows on 8 warps
# spilled least in every shipped variant compiled offline (benchmarks/README.md); windows of at most 32 keys take
# 4 warps. A tuning run on a GPU records its pick in _TUNED.
_SPACE = ((16, 8), (32, 8), (16, 4), (32, 4))
_TUNED: Dict[tuple, dict] = {}  # (head_dim, G, padded rank, dtype, options, padded window) -> configuration


def config_space(np_: int) -> List[dict]:
    """The launch configurations (BM query rows per block, num_warps) for windows padded to ``np_`` keys."""
    seen: List[dict] = []
    for rows, warps in _SPACE:
        cfg = dict(BM=min(rows, np_), num_warps=warps if np_ > 32 else 4)
        if cfg not in seen:
            seen.append(cfg)
    return seen


def launch_config(head_dim: int, grid: int, rank: int, dtype, np_: int, flags=()) -> dict:
    """The configuration recorded in :data:`_TUNED` for this key (head dim, G, rank, dtype, options, window
    size), else the first of :func:`config_space` (deterministic: what the interpreter always takes)."""
    key = (int(head_dim), int(grid), int(_pad(rank)), dtype if isinstance(dtype, str) else _dtype_name(dtype),
           _flag_names(flags), int(np_))
    return dict(_TUNED.get(key) or config_space(int(np_))[0])


if triton is not None:

    @triton.jit
    def _window_fwd_kernel(Q, K, V, C, W, OUT, BIAS, MASK, B, N, R, SCALE, WPP, heads,
                           sq0, sq1, sqn, sk0, sk1, skn, sv0, sv1, svn, so0, so1, son, sch, scj, scm, scr,
                           swh, swj, swr, sbb, sbh, sbi, sbj, smb, smh, smi, smj, LO, INVH,
                           D: tl.constexpr, G: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BASE: tl.constexpr,
                           DOT: tl.constexpr, SPLINE: tl.constexpr, BROW: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        offs = tl.arange(0, NP)
        offs_d = tl.arange(0, D)
        offs_r = tl.arange(0, RP)
        coef = C + h * sch + offs[:, None] * scj + offs_r[None, :] * scr  # (NP, RP) tiles, one per feature
        cmask = (offs[:, None] < N) & (offs_r[None, :] < R)
        wt = tl.load(W + h * swh + offs[None, :] * swj + offs_r[:, None] * swr,
                     mask=(offs[None, :] < N) & (offs_r[:, None] < R), other=0.0)  # W^T, (RP, NP)
        b0 = pid * WPP
        for w in range(0, tl.minimum(WPP, B - b0)):
            bh = (b0 + w) * heads + h
            kt = _cols(K, bh, heads, sk0, sk1, skn, offs, offs_d, N).to(tl.float32)
            v = _rows(V, bh, heads, sv0, sv1, svn, offs, offs_d, N).to(tl.float32)
            for i0 in range(0, NP, BM):  # query rows in blocks: (BM, NP) tiles keep the registers in bounds
                offs_m = i0 + tl.arange(0, BM)
                q = _rows(Q, bh, heads, sq0, sq1, sqn, offs_m, offs_d, N).to(tl.float32)
                s, valid = _logits(q, kt, SCALE, bh, heads, offs_m, offs, N, BIAS, sbb, sbh, sbi, sbj, BIAS, BIAS, 1,
                                   1, MASK, smb, smh, smi, smj, HAS_BIAS, False, HAS_MASK)
                hid = tl.zeros((BM, RP), dtype=tl.float32)
                if SPLINE == 0:
                    c1, s1 = _cos_sin(s, valid)  # zero features where masked: the recurrence keeps them 0
                    ck = c1
                    sk = s1
                    for g in tl.static_range(G):
                        hid += tl.dot(ck, tl.load(coef + g * scm, mask=cmask, other=0.0), input_precision=DOT)
                        hid += tl.dot(sk, tl.load(coef + (G + g) * scm, mask=cmask, other=0.0), input_precision=DOT)
                        ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
                else:
                    for m in tl.static_range(G + SPLINE):
                        f = tl.where(valid, _bspline(s, m, LO, INVH, SPLINE, 0), 0.0)
                        hid += tl.dot(f, tl.load(coef + m * scm, mask=cmask, other=0.0), input_precision=DOT)
                if HAS_BASE:
                    base = tl.where(valid, s * tl.sigmoid(s), 0.0)
                    hid += tl.dot(base, tl.load(coef + BROW * scm, mask=cmask, other=0.0), input_precision=DOT)
                sigma = tl.where(valid, tl.dot(hid, wt, input_precision=DOT), 0.0)
                out = tl.dot(sigma, v, input_precision=DOT)
                tl.store(OUT + (bh // heads) * so0 + h * so1 + offs_m[:, None] * son + offs_d[None, :],
                         out.to(OUT.dtype.element_ty), mask=offs_m[:, None] < N)

    @triton.jit
    def _window_bwd_kernel(Q, K, V, C, W, GO, DQ, DK, DV, DC, DW, DB, BIAS, MASK, B, N, R, SCALE, WPP, heads,
                           sq0, sq1, sqn, sk0, sk1, skn, sv0, sv1, svn, sg0, sg1, sgn, sch, scj, scm, scr,
                           swh, swj, swr, sdcp, sdcj, sdcm, sdcr, sdbp, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
                           LO, INVH,
                           D: tl.constexpr, G: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BASE: tl.constexpr,
                           DOT: tl.constexpr, SPLINE: tl.constexpr, BROW: tl.constexpr, BIAS_GRAD: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        slot = pid * heads + h  # this program's partial gradients
        offs = tl.arange(0, NP)
        offs_d = tl.arange(0, D)
        offs_r = tl.arange(0, RP)
        kr = (offs[:, None] < N) & (offs_r[None, :] < R)  # (keys, ranks) inside (N, r)
        coef = C + h * sch + offs[:, None] * scj + offs_r[None, :] * scr  # (NP, RP): for H
        coef_t = C + h * sch + offs[None, :] * scj + offs_r[:, None] * scr  # (RP, NP): for dF = dH C^T
        cmask_t = (offs[None, :] < N) & (offs_r[:, None] < R)
        wk = tl.load(W + h * swh + offs[:, None] * swj + offs_r[None, :] * swr, mask=kr, other=0.0)  # W, (NP, RP)
        wt = tl.trans(wk)
        dc_tile = DC + slot * sdcp + offs[:, None] * sdcj + offs_r[None, :] * sdcr
        dw = tl.zeros((NP, RP), dtype=tl.float32)
        rmask = offs[:, None] < N
        b0 = pid * WPP
        for w in range(0, tl.minimum(WPP, B - b0)):
            bh = (b0 + w) * heads + h
            kt = _cols(K, bh, heads, sk0, sk1, skn, offs, offs_d, N).to(tl.float32)
            vt = _cols(V, bh, heads, sv0, sv1, svn, offs, offs_d, N).to(tl.float32)
            dk = tl.zeros((NP, D), dtype=tl.float32)
            dv = tl.zeros((NP, D), dtype=tl.float32)
            for i0 in range(0, NP, BM):  # query rows in blocks: (BM, NP) tiles keep the registers in bounds
                offs_m = i0 + tl.arange(0, BM)
                mmask = offs_m[:, None] < N
                q = _rows(Q, bh, heads, sq0, sq1, sqn, offs_m, offs_d, N).to(tl.float32)
                s, valid = _logits(q, kt, SCALE, bh, heads, offs_m, offs, N, BIAS, sbb, sbh, sbi, sbj, BIAS, BIAS, 1,
                                   1, MASK, smb, smh, smi, smj, HAS_BIAS, False, HAS_MASK)
                go = _rows(GO, bh, heads, sg0, sg1, sgn, offs_m, offs_d, N).to(tl.float32)
                dsig = tl.where(valid, tl.dot(go, vt, input_precision=DOT), 0.0)  # dL/dsigma
                dh = tl.dot(dsig, wk, input_precision=DOT)  # dL/dH, (BM, RP)
                seen = kr & ((w > 0) | (i0 > 0))  # the partials start in uninitialised memory: add from the 2nd block
                hid = tl.zeros((BM, RP), dtype=tl.float32)
                ds = tl.zeros((BM, NP), dtype=tl.float32)
                if SPLINE == 0:
                    c1, s1 = _cos_sin(s, valid)
                    ck = c1
                    sk = s1
                    for g in tl.static_range(G):
                        hid += tl.dot(ck, tl.load(coef + g * scm, mask=kr, other=0.0), input_precision=DOT)
                        hid += tl.dot(sk, tl.load(coef + (G + g) * scm, mask=kr, other=0.0), input_precision=DOT)
                        dfc = tl.dot(dh, tl.load(coef_t + g * scm, mask=cmask_t, other=0.0), input_precision=DOT)
                        dfs = tl.dot(dh, tl.load(coef_t + (G + g) * scm, mask=cmask_t, other=0.0),
                                     input_precision=DOT)
                        ds += (g + 1.0) * (dfs * ck - dfc * sk)
                        _add_feature_grad(dc_tile + g * sdcm, seen, kr, ck, dh, DOT)
                        _add_feature_grad(dc_tile + (G + g) * sdcm, seen, kr, sk, dh, DOT)
                        ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
                else:
                    for m in tl.static_range(G + SPLINE):
                        f = tl.where(valid, _bspline(s, m, LO, INVH, SPLINE, 0), 0.0)
                        hid += tl.dot(f, tl.load(coef + m * scm, mask=kr, other=0.0), input_precision=DOT)
                        df = tl.dot(dh, tl.load(coef_t + m * scm, mask=cmask_t, other=0.0), input_precision=DOT)
                        ds += df * _bspline(s, m, LO, INVH, SPLINE, 1)
                        _add_feature_grad(dc_tile + m * sdcm, seen, kr, f, dh, DOT)
                if HAS_BASE:
                    sig = tl.sigmoid(s)
                    base = tl.where(valid, s * sig, 0.0)
                    hid += tl.dot(base, tl.load(coef + BROW * scm, mask=kr, other=0.0), input_precision=DOT)
                    dfb = tl.dot(dh, tl.load(coef_t + BROW * scm, mask=cmask_t, other=0.0), input_precision=DOT)
                    ds += dfb * (sig * (1.0 + s * (1.0 - sig)))
                    _add_feature_grad(dc_tile + BROW * sdcm, seen, kr, base, dh, DOT)
                ds = tl.where(valid, ds, 0.0)  # dL/dS
                sigma = tl.where(valid, tl.dot(hid, wt, input_precision=DOT), 0.0)
                dw += tl.dot(tl.trans(dsig), hid, input_precision=DOT)
                dv += tl.dot(tl.trans(sigma), go, input_precision=DOT)
                dk += tl.dot(tl.trans(ds), q, input_precision=DOT)
                dq = tl.dot(ds, tl.trans(kt), input_precision=DOT) * SCALE
                tl.store(DQ + bh * N * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                         mask=mmask)
                if BIAS_GRAD != 0:  # a bias shared by the windows (1): summed over this program's windows in its
                    # slice; a bias per window (2): its own slice
                    db_tile = DB + (pid if BIAS_GRAD == 1 else bh // heads) * sdbp + h * N * N + \
                        offs_m[:, None] * N + offs[None, :]
                    dbm = mmask & (offs[None, :] < N)
                    if BIAS_GRAD == 1:
                        ds += tl.load(db_tile, mask=dbm & (w > 0), other=0.0)
                    tl.store(db_tile, ds, mask=dbm)
            rows = bh * N * D + offs[:, None] * D + offs_d[None, :]  # dk, dv: contiguous (B, H, N, D)
            tl.store(DK + rows, (dk * SCALE).to(DK.dtype.element_ty), mask=rmask)
            tl.store(DV + rows, dv.to(DV.dtype.element_ty), mask=rmask)
        tl.store(DW + slot * N * R + offs[:, None] * R + offs_r[None, :], dw, mask=kr)


class _Args:
    """The kernels' pointer, stride and flag arguments for one call (bias and mask as broadcast views, no copies;
    placeholders where absent: a compile-time flag keeps the kernels from touching them). ``basis``: (lo, 1 / h,
    B-spline order or 0 for Fourier, has a base function), numbers as the operators take them."""

    def __init__(self, q: Tensor, coef: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                 grid: int, basis: Tuple[float, float, int, bool]) -> None:
        b, h, n, d = q.shape
        lo, inv_h, spline, has_base = basis
        np_ = int(_pad(n))
        self.flags = dict(HAS_BIAS=bias is not None, HAS_MASK=mask is not None, HAS_BASE=has_base, SPLINE=spline,
                          BROW=grid + spline if spline else 2 * grid, D=int(d), G=grid, NP=np_,
                          RP=int(_pad(coef.shape[2])), DOT=DOT_PRECISION)
        cfg = launch_config(d, grid, coef.shape[2], q.dtype, np_, self.flags)
        self.flags["BM"], self.warps = cfg["BM"], cfg["num_warps"]
        bias4 = bias.expand(b, h, n, n) if bias is not None else None
        mask4 = mask.view(torch.uint8).expand(b, h, n, n) if mask is not None else None
        self.bias, self.mask = (q if bias4 is None else bias4), (q if mask4 is None else mask4)
        self.bias_strides = bias4.stride() if bias4 is not None else (0,) * 4
        self.mask_strides = mask4.stride() if mask4 is not None else (0,) * 4
        self.coef_strides = (coef.stride(0), coef.stride(1), coef.stride(3), coef.stride(2))
        self.weight_strides = weight.stride()
        self.basis = (lo, inv_h)
        self.wpp = windows_per_program(b * h)
        self.grid = (triton.cdiv(b, self.wpp), h)


def _forward(q, k, v, coef, weight, a: _Args, scale: float, dtype: torch.dtype) -> Tensor:
    b, h, n, d = q.shape
    out = torch.empty(b, h, n, d, device=q.device, dtype=dtype)
    if out.numel() == 0:
        return out
    _launch(_window_fwd_kernel)[a.grid](
        q, k, v, coef, weight, out, a.bias, a.mask, b, n, coef.shape[2], scale, a.wpp, h,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *a.coef_strides, *a.weight_strides,
        *a.bias_strides, *a.mask_strides, *a.basis, num_warps=a.warps, num_stages=STAGES, **a.flags)
    return out


def _backward(q, k, v, coef, weight, go, a: _Args, scale: float, bias_grad: int) -> tuple:
    """(dq, dk, dv, dcoef (H, N, r, M), dweight (H, N, r), dbias (the bias's broadcast shape, 4-d) or None)."""
    b, h, n, d = q.shape
    r, m = coef.shape[2], coef.shape[3]
    programs = a.grid[0]
    dq, dk, dv = (torch.empty(b, h, n, d, device=q.device, dtype=t.dtype) for t in (q, k, v))
    dc = torch.empty(programs, h, n, r, m, device=q.device, dtype=torch.float32)  # per-program partials
    dw = torch.empty(programs, h, n, r, device=q.device, dtype=torch.float32)
    db = q
    if bias_grad:
        db = torch.empty(programs if bias_grad == 1 else b, h, n, n, device=q.device, dtype=torch.float32)
    if q.numel() == 0:  # no window: zero parameter gradients
        return dq, dk, dv, torch.zeros_like(coef), torch.zeros_like(weight), db.zero_() if bias_grad else None
    _launch(_window_bwd_kernel)[a.grid](
        q, k, v, coef, weight, go, dq, dk, dv, dc, dw, db, a.bias, a.mask, b, n, r, scale, a.wpp, h,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *go.stride()[:3], *a.coef_strides, *a.weight_strides,
        dc.stride(1), dc.stride(2), dc.stride(4), dc.stride(3), h * n * n, *a.bias_strides, *a.mask_strides,
        *a.basis, BIAS_GRAD=bias_grad, num_warps=a.warps, num_stages=STAGES, **a.flags)
    dbias = (db.sum(0, keepdim=True) if bias_grad == 1 else db) if bias_grad else None
    return dq, dk, dv, dc.sum(0), dw.sum(0), dbias


def _window_attention(q: Tensor, k: Tensor, v: Tensor, coefficients: Tensor, basis_scale: Tensor,
                      base_weight: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                      grid: int, scale: float, lo: float, inv_h: float, spline: int, dtype: torch.dtype) -> Tensor:
    """``sigma(S) V`` in ``dtype``, the output alone (the backward recomputes the rest from the inputs).

    q, k, v: (windows, H, N, d), any strides with a contiguous last dim; coefficients (H, N, r, M), basis_scale /
    base_weight / weight (H, N, r); bias: fp32 broadcastable to (windows, H, N, N); mask: bool, (.., 1, N) for
    padding or (.., N, N) (Swin's shifted windows)."""
    q, k, v = _rowwise(q), _rowwise(k), _rowwise(v)
    coef, weight32 = _coef(coefficients, basis_scale, base_weight), weight.float()
    a = _Args(q, coef, weight32, bias, mask, grid, (lo, inv_h, spline, base_weight is not None))
    return _forward(q, k, v, coef, weight32, a, scale, dtype)


def _window_attention_backward(go: Tensor, q: Tensor, k: Tensor, v: Tensor, coefficients: Tensor,
                               basis_scale: Tensor, base_weight: Optional[Tensor], weight: Tensor,
                               bias: Optional[Tensor], mask: Optional[Tensor], grid: int, scale: float, lo: float,
                               inv_h: float, spline: int, need_bias: bool) -> List[Tensor]:
    """[dq, dk, dv, dcoefficients, dbasis_scale, dbase_weight, dweight, dbias]; an empty tensor for an absent one
    (no base function; no bias, or ``need_bias`` False): an operator's outputs must not be None or alias."""
    q, k, v = _rowwise(q), _rowwise(k), _rowwise(v)
    coef, weight32 = _coef(coefficients, basis_scale, base_weight), weight.float()
    bias_grad = 0
    if bias is not None and need_bias:  # 1: one bias for every window (summed per program), 2: one per window
        bias_grad = 1 if bias.expand(*q.shape[:2], q.shape[2], q.shape[2]).stride(0) == 0 else 2
    a = _Args(q, coef, weight32, bias, mask, grid, (lo, inv_h, spline, base_weight is not None))
    dq, dk, dv, dc, dw, db = _backward(q, k, v, coef, weight32, _rowwise(go), a, scale, bias_grad)
    m = coefficients.shape[-1]
    dc_basis = dc[..., :m]
    none = q.new_empty(0, dtype=torch.float32)
    return [dq, dk, dv, dc_basis * basis_scale.float().unsqueeze(-1), (dc_basis * coefficients.float()).sum(-1),
            dc[..., m].clone() if base_weight is not None else none, dw,
            _sum_to(db, bias.shape) if db is not None else none.clone()]


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:9])  # q, k, v, coefficients, basis_scale, base_weight, weight, bias, mask
    ctx.args = tuple(inputs[9:14])  # grid, scale, lo, inv_h, spline (not the output dtype)


def _gradients(ctx, go: Tensor, backward) -> tuple:
    """The autograd formula of ``karat::window_attention``: ``backward`` (the backward operator, or its body in
    eager mode) on the saved inputs; None for an input that gets no gradient."""
    saved = ctx.saved_tensors
    need_bias = saved[7] is not None and ctx.needs_input_grad[7]
    grads = backward(go, *saved, *ctx.args, need_bias)
    present = (True,) * 5 + (saved[5] is not None, True, need_bias)
    return (*(g if keep else None for g, keep in zip(grads, present)), *(None,) * 7)  # mask, then the constants


if triton is not None:
    window_attention = fused_ops.define("karat::window_attention", _window_attention, [_window_fwd_kernel])
    window_attention_backward = fused_ops.define("karat::window_attention_backward", _window_attention_backward,
                                                 [_window_bwd_kernel])
    window_attention.register_autograd(lambda ctx, go: _gradients(ctx, go, window_attention_backward),
                                       setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The operators' bodies and formula as one autograd node without the operator dispatch (what an eager call
    runs, as in ``fused_ops``). It saves the inputs only (softmax attention's memory). A backward kernel that fails
    to build falls back to autograd through the reference path (a window is small) and turns the whole-window
    kernels off for the process."""

    @staticmethod
    def forward(ctx, *inputs):
        *inputs, op = inputs
        with fused_ops._direct_launches():
            out = _window_attention(*inputs)
        _setup_context(ctx, inputs, out)
        ctx.op = op
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        try:
            with fused_ops._direct_launches():
                return (*_gradients(ctx, go, _window_attention_backward), None)
        except Exception as e:  # noqa: BLE001  a backward kernel that fails to build must not end the run
            disable(f"backward: {type(e).__name__}: {e}")
            return _backward_reference(ctx, go)


def _backward_reference(ctx, go: Tensor) -> tuple:
    """Every gradient by autograd through the reference path (what runs when the backward kernel fails)."""
    q, k, v, coefficients, basis_scale, base_weight, weight, bias, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    scale = ctx.args[1]
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
        bd = bias.detach().requires_grad_() if bias is not None else None
        out = reference.attend(ctx.op, qd, kd, vd, bd, mask, scale)
        params = (coefficients, basis_scale, base_weight, weight)
        wanted = [t for t, n in zip((qd, kd, vd, *params, bd), need[:8]) if n and t is not None]
        grads = iter(torch.autograd.grad(out, wanted, go.to(out.dtype), allow_unused=True))
        result = [next(grads) if n and t is not None else None for t, n in zip((qd, kd, vd, *params, bd), need[:8])]
    return (*result, *(None,) * 8)  # mask, the constants, op


def _run_probe(q: Tensor, coefficients: Tensor, ones: Tensor, base: Optional[Tensor], bias: Optional[Tensor],
               rel_h: Optional[Tensor], rel_w: Optional[Tensor], mask: Optional[Tensor], args: tuple) -> None:
    """``fused_ops``' build check for this family: a tiny forward and backward through the operators."""
    out = window_attention(q, q, q, coefficients, ones, base, ones, bias, mask, *args, q.dtype)
    window_attention_backward(out, q, q, q, coefficients, ones, base, ones, bias, mask, *args, bias is not None)


fused_ops.PROBES["window"] = (_run_probe, disable)


def attend(op: KArAtOperator, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Bias] = None,
           key_mask: Optional[Tensor] = None, scale: float = 1.0) -> Tensor:
    """``sigma(S) V`` of a ``phi1_w2`` operator over windows of at most 64 keys, with autocast off; the output comes
    back in the autocast dtype under autocast, else in q's dtype. ``choose`` has checked :func:`supports`. Traced
    (``torch.compile``, export): the operator ``karat::window_attention``; eager: the same bodies (:class:`_Eager`)."""
    phi = op.phi
    lo, inv_h, spline, _ = _basis_args(phi, op.cfg.grid)
    args = (q, k, v, phi.basis.coefficients, phi.basis_scale, phi.base_weight, op.weight,
            upcast(bias) if bias is not None else None, key_mask, op.cfg.grid, float(scale), lo, inv_h, spline,
            output_dtype(q))
    with autocast_off(q.device.type):
        if fused_ops._tracing():
            return window_attention(*args)
        return _Eager.apply(*args, op)


KERNELS = ("_window_fwd_kernel", "_window_bwd_kernel")
_FP32_POINTERS = ("C", "W", "DC", "DW", "DB", "BIAS")
_TENSOR_POINTERS = ("Q", "K", "V", "OUT", "GO", "DQ", "DK", "DV")

# What the offline compiles (tests/test_fused_compile.py, tools/kernel_table.py) cover, as (head_dim, G, r, q/k/v
# dtype, flags): the plain Fourier kernel at the largest window; B-splines with every flag (bias, mask, SiLU base);
# Swin-T's window attention (49 keys, head_dim 32, G = 3, r = 12, bf16 under autocast, the bias table and the
# shifted-window mask).
SHIPPED_VARIANTS = {
    "plain-n64": (64, 3, 12, "fp32", dict(tokens=64)),
    "bspline-all-flags-n64": (64, 5, 12, "bf16", dict(spline=3, bias=True, mask=True, base=True, tokens=64)),
    "swin-t-bf16": (32, 3, 12, "bf16", dict(bias=True, mask=True, tokens=49)),
}
# Bytes of register spill stores (and loads) a shipped variant's kernel may have (any other: none), as measured in
# benchmarks/gpu_kernel_table.md with some headroom, keyed (variant, kernel) or, for one architecture,
# (variant, kernel, arch). The backward keeps the window's k and v and its dk and dv sums (4 x 64 x head_dim fp32)
# live across the query-row blocks, beside a block's S, its features and their gradients: 0.6-0.9 KB per thread on
# sm_90, 1-1.1 KB on sm_80. Swin-T's head_dim 32 with a bias or mask on sm_80 is an outlier: ptxas allocates 32
# registers and spills 6.3 KB (9.1 KB loaded back), the least in the space (benchmarks/gpu_kernel_space.md: 8-17 KB
# elsewhere). Summing dk and dv in global memory would take most of it away (at the cost of bf16 partial sums).
SPILL_BUDGET = {("plain-n64", "_window_bwd_kernel"): 1280, ("bspline-all-flags-n64", "_window_bwd_kernel"): 1152,
                ("swin-t-bf16", "_window_bwd_kernel"): 896, ("swin-t-bf16", "_window_bwd_kernel", "sm_80"): 10240}


def compile_offline(arch: int, head_dim: int, grid: int, rank: int, dtype: str = "fp32", *, bias: bool = False,
                    mask: bool = False, base: bool = False, spline: int = 0, tokens: int = 49,
                    config: Optional[dict] = None, space: bool = False) -> dict:
    """Compile both kernels of one variant for ``sm_<arch>`` without a GPU (Triton's bundled ptxas):
    ``{kernel name: shared memory bytes}``. ``dtype`` is that of q, k, v, the output and the gradients
    (``fp32``, ``bf16``, ``fp16``); ``spline`` a B-spline order (0: Fourier); ``tokens`` the window's keys;
    ``config`` a launch configuration (default: :func:`launch_config`'s); ``space``: compile every configuration of
    :func:`config_space` instead (the default first), ``{kernel name: [shared memory bytes, ...]}``.
    ``offline.stats_of(compile_offline, ...)`` reads registers, spills and the instruction mix of the same compile."""
    np_ = _pad(tokens)
    flags = dict(HAS_BIAS=bias, HAS_MASK=mask, HAS_BASE=base, SPLINE=spline)
    default = config or launch_config(head_dim, grid, rank, dtype, np_, flags)
    shared: dict = {}
    for cfg in (config_space(np_) if space else [default]):
        for name, used in _compile_both(arch, head_dim, grid, rank, dtype, np_, flags, cfg).items():
            shared.setdefault(name, []).append(used)
    return shared if space else {name: used[0] for name, used in shared.items()}


def _compile_both(arch: int, head_dim: int, grid: int, rank: int, dtype: str, np_: int, flags: dict,
                  cfg: dict) -> dict:
    from . import offline

    spline = flags["SPLINE"]
    const = dict(D=head_dim, G=grid, NP=np_, RP=_pad(rank), BM=cfg["BM"], DOT=DOT_PRECISION, **flags,
                 BROW=grid + spline if spline else 2 * grid, BIAS_GRAD=int(flags["HAS_BIAS"]))
    shared = {}
    for name in KERNELS:
        kernel = globals()[name]
        sig = {}
        for a in kernel.arg_names:
            if a in const:
                sig[a] = "constexpr"
            elif a == "MASK":
                sig[a] = "*u8"
            elif a in _FP32_POINTERS:
                sig[a] = "*fp32"
            elif a in _TENSOR_POINTERS:
                sig[a] = f"*{dtype}"
            else:
                sig[a] = "fp32" if a in ("LO", "INVH", "SCALE") else "i32"
        compiled = offline.compile_kernel(kernel, sig, const, arch, num_warps=cfg["num_warps"], num_stages=STAGES)
        shared[name] = compiled.metadata.shared
        limit = fused_triton.SHARED_MEMORY_LIMIT.get(arch, 101376)
        if "cubin" not in compiled.asm or shared[name] > limit:
            raise RuntimeError(f"{name} for sm_{arch} (head_dim {head_dim}, G {grid}, {dtype}, {const}): "
                               f"{shared[name]} bytes of shared memory, limit {limit}")
    return shared
