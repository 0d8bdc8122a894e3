"""Fused Triton kernels for ``phi1_w2`` with the Fourier or B-spline basis: what every host runs on CUDA.

Flash-attention style: tiles of ``S = q k^T (+ bias)`` are recomputed from ``q`` and ``k`` in registers and never
written to memory, and so are their features (``cos gS``, ``sin gS`` by the angle-addition recurrence from one
``cos`` and one ``sin``, and ``SiLU(S)`` for a base function). Memory is O(N (r + d)) per head.

* forward: one program per (query block, batch x head) accumulates ``H = Phi(S)`` (N x r);
* backward, ``dq``: one program per (query block, batch x head) loops over key blocks; it also writes what the
  bias needs: the decomposed terms' gradients, summed in-kernel, or ``dS`` tiles for a dense bias that needs one;
* backward, ``dk`` and the coefficient gradient: one program per (key block, batch x head) loops over query
  blocks and writes its partial coefficient gradient for that batch element; the batch partials are summed
  afterwards, so no gradient needs one atomic add per element.

The same three kernels serve every variant through compile-time flags:

* an additive bias: a dense tensor broadcastable to ``(B, H, N, N)`` (Swin's and mmseg's bias tables), loaded per
  tile with zero strides where it broadcasts; or ViTDet's decomposed relative position
  (:class:`karat.relpos.DecomposedRelPos`), added per tile from its ``N x k_h`` and ``N x k_w`` terms, never as
  ``N x N``;
* a boolean key mask broadcastable to ``(B, H, N, N)``: padding (one row for all queries) and shifted windows
  (per query); a masked entry has zero features and zero gradient;
* the SiLU base function as one more feature with its own coefficients;
* B-splines of any order on the basis's uniform knots instead of Fourier features (the cardinal B-spline as a
  truncated-power sum, evaluated on the half of its support nearer 0, and its derivative the same way);
* bf16 / fp16 ``q, k`` (after autocast or ``model.half()``): loaded into fp32, every sum in fp32.

The host's side is kept small, because at ViT-Tiny widths a GPU step waits on the host (``tools/host_ops.py``):
``q`` and ``k`` are read in place through their batch, head and token strides (timm's slices of the fused qkv
projection, no copies), the softmax scale is applied in-kernel, the coefficients are read in their own layout, and
the whole ``sigma(S) V`` (kernels, coefficient scaling, rank expansion ``H (W^T V)``) is one operator and one
autograd node whose gradients are written out (``karat.kernels.fused_ops``, which registers them for
``torch.compile`` and CUDA graphs; the launches below go through :func:`_launch` for that).

Precision per product: ``q k^T`` runs on tensor cores as three TF32 products for fp32 q, k (about fp32's error,
which the frequencies ``g <= G`` multiply) and as one for bf16 / fp16 (their values are exact in TF32); the
products with the coefficients and the gradient products run as TF32 (``DOT_PRECISION``, about 1.5e-3 relative
error on an H100, benchmarks/gpu/suite.md); the one-hot sums of the decomposed bias gradient as three TF32
products. ``cos S`` and ``sin S`` are the SFU's after reducing S to [-pi, pi]. Offsets are 64-bit. The launch
configuration (tile sizes, warps, pipeline stages) comes from :func:`launch_config`, keyed by head dim, feature
count, rank, dtype, options and N bucket, chosen from the offline table of registers, spills and instructions per
logit (``python -m tools.kernel_table``, benchmarks/gpu_kernel_table.md); ``tests/test_fused_compile.py``
compiles every shipped variant for sm_80 and sm_90 without a GPU and fails on a spill or a shared-memory overrun.
What the kernels do not serve, or a variant whose kernels fail to build here (tried once, before any
trace), :func:`supports` names in one line; ``karat.kernels.choose`` then takes the
efficient path. Tested on the CPU with ``TRITON_INTERPRET=1``, and on an H100 by ``tests/test_gpu_fused.py``.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

try:  # Triton ships with CUDA builds of torch; the core works without it.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
else:
    try:
        from torch.library import wrap_triton
    except ImportError:  # torch < 2.6: the fused operators are opaque to torch.compile (karat.kernels.fused_ops)
        wrap_triton = None

from ..bases import FourierBasis, SplineBasis
from ..operator import KArAtOperator
from ..precision import autocast_off, output_dtype, upcast
from ..relpos import Bias, DecomposedRelPos
from . import efficient

# karat.kernels.fused_ops, the operators around the launch wrappers below; it imports this module and sets this
# name when it loads (karat.kernels imports it), so the two modules form no import cycle
fused_ops = None
DOT_PRECISION = "tf32"  # feature x coefficient and gradient products (q k^T is always "ieee")
MAX_HEAD_DIM = 256
_DISABLED: Optional[str] = None


def disable(reason: str) -> None:
    """Stop ``impl='auto'`` from choosing the fused kernels in this process (after they failed to run)."""
    global _DISABLED
    if _DISABLED is None:
        warnings.warn(f"KArAt fused kernels disabled, falling back to the efficient PyTorch path: {reason}")
    _DISABLED = reason


def supports(op: KArAtOperator, q: torch.Tensor, bias: Optional[Bias],
             key_mask: Optional[torch.Tensor]) -> Optional[str]:
    """None when the fused kernels can evaluate this call, else the reason (one line)."""
    if _DISABLED is not None:
        return f"the fused kernels failed earlier in this process ({_DISABLED})"
    why = unsupported(op, q, bias, key_mask)
    if why is not None:
        return why
    if not fused_ops.builds(fused_ops.variant("flash", op, q, bias, key_mask)):  # settled before any trace or capture
        return f"the fused kernels failed to build in this process ({_DISABLED})"
    return None


def unsupported(op: KArAtOperator, q: torch.Tensor, bias: Optional[Bias],
                key_mask: Optional[torch.Tensor]) -> Optional[str]:
    """What no Triton kernel of KArAt serves (one line), else None: the configuration and the call's device,
    without building anything (``karat.kernels.fused_window`` shares these limits)."""
    if triton is None:
        return "Triton is not installed"
    if op.mode == "w1_phi2":
        return "w1_phi2 needs no kernel: the efficient path is linear in N (U = q (W k)^T)"
    if op.mode != "phi1_w2":
        return "the fused kernels cover phi1_w2 (a non-modular operator runs blockwise in the efficient path)"
    basis = op.phi.basis
    if not isinstance(basis, (FourierBasis, SplineBasis)):
        return (f"the fused kernels evaluate Fourier and B-spline features; {type(basis).__name__} runs blockwise "
                "in the efficient path")
    if isinstance(basis, SplineBasis) and basis.order < 1:
        return "the fused kernels evaluate B-splines of order >= 1"
    if op.cfg.project_l1:
        return "project_l1 needs the materialised sigma(S)"
    if op.phi.has_base and not isinstance(op.phi.base_fn, nn.SiLU):
        return f"the fused kernels evaluate the SiLU base function, not {type(op.phi.base_fn).__name__}"
    d = q.shape[-1]
    if d < 16 or d > MAX_HEAD_DIM or d & (d - 1):
        return f"head_dim {d} must be a power of two from 16 to {MAX_HEAD_DIM}"
    if isinstance(bias, DecomposedRelPos) and bias.num_keys != op.num_tokens:
        return f"the decomposed bias covers {bias.num_keys} keys, not the operator's {op.num_tokens}"
    if key_mask is not None and key_mask.dtype != torch.bool:
        return "the key mask must be boolean"
    if not (q.is_cuda or _interpreting()):
        return "the fused kernels run on CUDA (or under TRITON_INTERPRET=1)"
    return None


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(kernel):
    """``kernel`` as ``karat.kernels.fused_ops``' operators launch it: through ``wrap_triton``, so that
    ``torch.compile`` sees the launch (eager calls go straight to Triton); under the interpreter (or before torch
    2.6), directly but not at all on fake tensors, which makes the operators' bodies their own fake implementations."""
    if wrap_triton is not None and not _interpreting():
        return wrap_triton(kernel)
    return _Direct(kernel)


class _Direct:
    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:  # a fake implementation
            return lambda *args, **kwargs: None
        return self.kernel[grid]


if triton is not None:
    # the SFU's sine and cosine on a GPU; numpy's under the interpreter (which has no libdevice)
    FAST_TRIG = tl.constexpr(not _interpreting())

    @triton.jit
    def _rows(P, bh, heads, s0, s1, sn, offs, offs_d, N):
        """A (rows, D) tile of head ``bh % heads`` of batch element ``bh // heads`` of a (B, H, N, D) tensor with
        strides (s0, s1, sn, 1) (a slice of a fused qkv is read in place), in its own dtype; rows past N read as
        zeros."""
        base = P + (bh // heads) * s0 + (bh % heads) * s1  # 64-bit offsets in the scalar, 32-bit in the tile
        return tl.load(base + offs[:, None] * sn + offs_d[None, :], mask=offs[:, None] < N, other=0.0)

    @triton.jit
    def _cols(P, bh, heads, s0, s1, sn, offs, offs_d, N):
        """The same tile transposed, (D, cols), as the right operand of ``q k^T``."""
        base = P + (bh // heads) * s0 + (bh % heads) * s1
        return tl.load(base + offs[None, :] * sn + offs_d[:, None], mask=offs[None, :] < N, other=0.0)

    @triton.jit
    def _rank_rows(P, bh, sb, sn, offs, offs_r, N, R):
        """A (rows, RP) tile of a (B*H, N, r) fp32 tensor (dL/dH); rows past N and ranks past r read as zeros."""
        return tl.load((P + bh * sb) + offs[:, None] * sn + offs_r[None, :],
                       mask=(offs[:, None] < N) & (offs_r[None, :] < R), other=0.0)

    @triton.jit
    def _add_feature_grad(P, seen, dmask, f, dh, DOT: tl.constexpr):
        """``dc += f^T dh`` for one feature's rows of this key block: read (where ``seen``), add, store. The key
        block's program owns those rows, so no atomics."""
        tl.store(P, tl.load(P, mask=seen, other=0.0) + tl.dot(tl.trans(f), dh, input_precision=DOT), mask=dmask)

    @triton.jit
    def _logits(q, kt, SCALE, bh, heads, offs_m, offs_n, N, BIAS, sbb, sbh, sbi, sbj, RELH, RELW, KH, KW,
                MASK, smb, smh, smi, smj, HAS_BIAS: tl.constexpr, HAS_REL: tl.constexpr, HAS_MASK: tl.constexpr):
        """The (BM, BN) tile of S = scale q k^T (+ bias) and where it is valid (inside N, not masked). On tensor
        cores: fp32 q, k as three TF32 products (about fp32's error, which the frequencies g <= G multiply); bf16 /
        fp16 q, k as one (their values are exact in TF32: exact products, fp32 sums)."""
        if q.dtype == tl.float32:
            s = tl.dot(q, kt, input_precision="tf32x3") * SCALE
        else:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="tf32") * SCALE
        valid = (offs_m[:, None] < N) & (offs_n[None, :] < N)
        b = bh // heads
        h = bh % heads
        if HAS_BIAS:
            s += tl.load((BIAS + b * sbb + h * sbh) + offs_m[:, None] * sbi + offs_n[None, :] * sbj, mask=valid,
                         other=0.0).to(tl.float32)
        if HAS_REL:
            s += tl.load((RELH + bh * N * KH) + offs_m[:, None] * KH + (offs_n // KW)[None, :], mask=valid, other=0.0)
            s += tl.load((RELW + bh * N * KW) + offs_m[:, None] * KW + (offs_n % KW)[None, :], mask=valid, other=0.0)
        if HAS_MASK:
            keep = tl.load((MASK + b * smb + h * smh) + offs_m[:, None] * smi + offs_n[None, :] * smj, mask=valid,
                           other=0)
            valid = valid & (keep != 0)
        return s, valid

    @triton.jit
    def _cos_sin(s, valid):
        """(cos s, sin s), zero where not valid. The argument is reduced to [-pi, pi] first (2 pi in two parts,
        the first exact in a product with any n < 2^16), then the SFU's sine and cosine (MUFU.SIN / COS, about
        1e-6 absolute error there) take one instruction each instead of libdevice's software routine with its
        slow path for large arguments (a stack array and fp64 work). The interpreter evaluates the same reduction
        with numpy's cos and sin."""
        n = tl.floor(s * 0.15915494309189535 + 0.5)
        x = s - n * 6.28125
        x = x - n * 0.0019353071795864769
        if FAST_TRIG:
            c = libdevice.fast_cosf(x)
            sn = libdevice.fast_sinf(x)
        else:
            c = tl.cos(x)
            sn = tl.sin(x)
        return tl.where(valid, c, 0.0), tl.where(valid, sn, 0.0)

    @triton.jit
    def _bspline(s, m: tl.constexpr, LO, INVH, K: tl.constexpr, DERIV: tl.constexpr):
        """B-spline ``m`` of order K on uniform knots (its derivative in s with DERIV=1): the cardinal B-spline
        ``N_K(u)``, ``u = (s - lo) / h + K - m``, as the truncated-power sum over the half of its support nearer
        0 (``N_K(u) = N_K(K + 1 - u)``), which keeps the terms small."""
        u = (s - LO) * INVH + (K - m)
        far = u > (K + 1) * 0.5
        v = tl.where(far, (K + 1) - u, u)
        P: tl.constexpr = K - DERIV
        acc = tl.zeros_like(s)
        c = 1.0  # (-1)^i binom(K + 1, i)
        for i in tl.static_range(K + 2):
            t = v - i
            if P == 0:
                p = tl.where(t > 0.0, 1.0, 0.0)
            else:
                t = tl.maximum(t, 0.0)
                p = t
                for _ in tl.static_range(P - 1):
                    p = p * t
            acc += c * p
            c = -c * (K + 1 - i) / (i + 1)
        fact = 1.0
        for j in tl.static_range(1, P + 1):
            fact = fact * j
        val = acc / fact
        if DERIV == 1:
            val = tl.where(far, -val, val) * INVH
        return tl.where((u >= 0.0) & (u < K + 1.0), val, 0.0)

    @triton.jit
    def _phi_fwd_kernel(Q, K, C, Hout, BIAS, RELH, RELW, MASK, N, R, SCALE, sq0, sq1, sqn, sk0, sk1, skn, scj, scm,
                        scr, shb, shn, heads,
                        sbb, sbh, sbi, sbj, KH, KW, smb, smh, smi, smj, LO, INVH,
                        D: tl.constexpr, G: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_REL: tl.constexpr, HAS_MASK: tl.constexpr,
                        HAS_BASE: tl.constexpr, DOT: tl.constexpr, SPLINE: tl.constexpr, BROW: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        h = bh % heads
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        offs_r = tl.arange(0, RP)
        q = _rows(Q, bh, heads, sq0, sq1, sqn, offs_m, offs_d, N)
        acc = tl.zeros((BM, RP), dtype=tl.float32)
        c_head = C + h * N * scj
        for j0 in range(0, N, BN):
            offs_n = j0 + tl.arange(0, BN)
            kt = _cols(K, bh, heads, sk0, sk1, skn, offs_n, offs_d, N)
            s, valid = _logits(q, kt, SCALE, bh, heads, offs_m, offs_n, N, BIAS, sbb, sbh, sbi, sbj, RELH, RELW, KH,
                               KW, MASK, smb, smh, smi, smj, HAS_BIAS, HAS_REL, HAS_MASK)
            coef = c_head + offs_n[:, None] * scj + offs_r[None, :] * scr
            cmask = (offs_n[:, None] < N) & (offs_r[None, :] < R)
            if SPLINE == 0:
                c1, s1 = _cos_sin(s, valid)  # zero features where masked: the recurrence keeps them zero
                ck = c1
                sk = s1
                for g in tl.static_range(G):
                    cc = tl.load(coef + g * scm, mask=cmask, other=0.0)
                    cs = tl.load(coef + (G + g) * scm, mask=cmask, other=0.0)
                    acc += tl.dot(ck, cc, input_precision=DOT) + tl.dot(sk, cs, input_precision=DOT)
                    ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
            else:
                for m in tl.static_range(G + SPLINE):
                    f = tl.where(valid, _bspline(s, m, LO, INVH, SPLINE, 0), 0.0)
                    acc += tl.dot(f, tl.load(coef + m * scm, mask=cmask, other=0.0), input_precision=DOT)
            if HAS_BASE:
                base = tl.where(valid, s * tl.sigmoid(s), 0.0)
                acc += tl.dot(base, tl.load(coef + BROW * scm, mask=cmask, other=0.0), input_precision=DOT)
        tl.store(Hout + bh * shb + offs_m[:, None] * shn + offs_r[None, :], acc,
                 mask=(offs_m[:, None] < N) & (offs_r[None, :] < R))

    @triton.jit
    def _dscore(s, valid, dh, c_head, offs_n, offs_r, N, R, scj, scm, scr, LO, INVH, G: tl.constexpr,
                HAS_BASE: tl.constexpr, DOT: tl.constexpr, SPLINE: tl.constexpr, BROW: tl.constexpr):
        """dL/dS for one tile from dL/dH (``dh``, (BM, RP)); zero where the tile is not valid."""
        ds = tl.zeros_like(s)
        coef_t = c_head + offs_n[None, :] * scj + offs_r[:, None] * scr
        cmask = (offs_n[None, :] < N) & (offs_r[:, None] < R)
        if SPLINE == 0:
            c1, s1 = _cos_sin(s, valid)
            ck = c1
            sk = s1
            for g in tl.static_range(G):
                dfc = tl.dot(dh, tl.load(coef_t + g * scm, mask=cmask, other=0.0), input_precision=DOT)
                dfs = tl.dot(dh, tl.load(coef_t + (G + g) * scm, mask=cmask, other=0.0), input_precision=DOT)
                ds += (g + 1.0) * (dfs * ck - dfc * sk)
                ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        else:
            for m in tl.static_range(G + SPLINE):
                df = tl.dot(dh, tl.load(coef_t + m * scm, mask=cmask, other=0.0), input_precision=DOT)
                ds += df * _bspline(s, m, LO, INVH, SPLINE, 1)
        if HAS_BASE:
            sig = tl.sigmoid(s)
            dfb = tl.dot(dh, tl.load(coef_t + BROW * scm, mask=cmask, other=0.0), input_precision=DOT)
            ds += dfb * (sig * (1.0 + s * (1.0 - sig)))
        return tl.where(valid, ds, 0.0)

    @triton.jit
    def _phi_bwd_dq_kernel(Q, K, C, DH, DQ, BIAS, RELH, RELW, MASK, DB, DRELH, DRELW,
                           N, R, SCALE, sq0, sq1, sqn, sk0, sk1, skn, scj, scm, scr, shb, shn, heads,
                           sbb, sbh, sbi, sbj, KH, KW, smb, smh, smi, smj, LO, INVH,
                           D: tl.constexpr, G: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_REL: tl.constexpr, HAS_MASK: tl.constexpr,
                           HAS_BASE: tl.constexpr, DOT: tl.constexpr, SPLINE: tl.constexpr, BROW: tl.constexpr,
                           BIAS_GRAD: tl.constexpr, KHP: tl.constexpr, KWP: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        h = bh % heads
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        offs_r = tl.arange(0, RP)
        mrow = offs_m[:, None] < N
        q = _rows(Q, bh, heads, sq0, sq1, sqn, offs_m, offs_d, N)
        dh = _rank_rows(DH, bh, shb, shn, offs_m, offs_r, N, R)
        dq = tl.zeros((BM, D), dtype=tl.float32)
        drh = tl.zeros((BM, KHP), dtype=tl.float32)
        drw = tl.zeros((BM, KWP), dtype=tl.float32)
        c_head = C + h * N * scj
        for j0 in range(0, N, BN):
            offs_n = j0 + tl.arange(0, BN)
            kt = _cols(K, bh, heads, sk0, sk1, skn, offs_n, offs_d, N)
            s, valid = _logits(q, kt, SCALE, bh, heads, offs_m, offs_n, N, BIAS, sbb, sbh, sbi, sbj, RELH, RELW, KH,
                               KW, MASK, smb, smh, smi, smj, HAS_BIAS, HAS_REL, HAS_MASK)
            ds = _dscore(s, valid, dh, c_head, offs_n, offs_r, N, R, scj, scm, scr, LO, INVH, G, HAS_BASE, DOT, SPLINE,
                         BROW)
            dq += tl.dot(ds, tl.trans(kt).to(tl.float32), input_precision=DOT)
            if BIAS_GRAD:
                tl.store(DB + bh * N * N + offs_m[:, None] * N + offs_n[None, :], ds,
                         mask=mrow & (offs_n[None, :] < N))
            if HAS_REL:  # sum dS over the keys of each grid row / column: products with one-hot matrices
                onehot_h = ((offs_n // KW)[:, None] == tl.arange(0, KHP)[None, :]).to(tl.float32)
                onehot_w = ((offs_n % KW)[:, None] == tl.arange(0, KWP)[None, :]).to(tl.float32)
                drh += tl.dot(ds, onehot_h, input_precision="tf32x3")  # one-hots are exact in TF32
                drw += tl.dot(ds, onehot_w, input_precision="tf32x3")
        tl.store(DQ + bh * N * D + offs_m[:, None] * D + offs_d[None, :], dq * SCALE, mask=mrow)  # (B, H, N, D)
        if HAS_REL:
            offs_kh = tl.arange(0, KHP)
            offs_kw = tl.arange(0, KWP)
            row = bh * N + offs_m[:, None]
            tl.store(DRELH + row * KH + offs_kh[None, :], drh, mask=mrow & (offs_kh[None, :] < KH))
            tl.store(DRELW + row * KW + offs_kw[None, :], drw, mask=mrow & (offs_kw[None, :] < KW))

    @triton.jit
    def _phi_bwd_dk_kernel(Q, K, C, DH, DK, DC, BIAS, RELH, RELW, MASK,
                           N, R, SCALE, sq0, sq1, sqn, sk0, sk1, skn, scj, scm, scr, shb, shn, sdb, sdj, sdm, sdr,
                           heads,
                           sbb, sbh, sbi, sbj, KH, KW, smb, smh, smi, smj, LO, INVH,
                           D: tl.constexpr, G: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_REL: tl.constexpr, HAS_MASK: tl.constexpr,
                           HAS_BASE: tl.constexpr, DOT: tl.constexpr, SPLINE: tl.constexpr, BROW: tl.constexpr):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        h = bh % heads
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        offs_r = tl.arange(0, RP)
        kt = _cols(K, bh, heads, sk0, sk1, skn, offs_n, offs_d, N)
        dk = tl.zeros((BN, D), dtype=tl.float32)
        c_head = C + h * N * scj
        coef_t = c_head + offs_n[None, :] * scj + offs_r[:, None] * scr
        cmask_t = (offs_n[None, :] < N) & (offs_r[:, None] < R)
        dmask = (offs_n[:, None] < N) & (offs_r[None, :] < R)
        dc_tile = DC + bh * sdb + offs_n[:, None] * sdj + offs_r[None, :] * sdr
        for i0 in range(0, N, BM):
            offs_m = i0 + tl.arange(0, BM)
            q = _rows(Q, bh, heads, sq0, sq1, sqn, offs_m, offs_d, N)
            dh = _rank_rows(DH, bh, shb, shn, offs_m, offs_r, N, R)
            s, valid = _logits(q, kt, SCALE, bh, heads, offs_m, offs_n, N, BIAS, sbb, sbh, sbi, sbj, RELH, RELW, KH,
                               KW, MASK, smb, smh, smi, smj, HAS_BIAS, HAS_REL, HAS_MASK)
            seen = dmask & (i0 > 0)  # the partial gradient starts in uninitialised memory: read it from the 2nd block
            ds = tl.zeros_like(s)
            if SPLINE == 0:
                c1, s1 = _cos_sin(s, valid)  # zero on padded rows and masked entries
                ck = c1
                sk = s1
                for g in tl.static_range(G):
                    dfc = tl.dot(dh, tl.load(coef_t + g * scm, mask=cmask_t, other=0.0), input_precision=DOT)
                    dfs = tl.dot(dh, tl.load(coef_t + (G + g) * scm, mask=cmask_t, other=0.0), input_precision=DOT)
                    ds += (g + 1.0) * (dfs * ck - dfc * sk)
                    _add_feature_grad(dc_tile + g * sdm, seen, dmask, ck, dh, DOT)
                    _add_feature_grad(dc_tile + (G + g) * sdm, seen, dmask, sk, dh, DOT)
                    ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
            else:
                for m in tl.static_range(G + SPLINE):
                    f = tl.where(valid, _bspline(s, m, LO, INVH, SPLINE, 0), 0.0)
                    df = tl.dot(dh, tl.load(coef_t + m * scm, mask=cmask_t, other=0.0), input_precision=DOT)
                    ds += df * _bspline(s, m, LO, INVH, SPLINE, 1)
                    _add_feature_grad(dc_tile + m * sdm, seen, dmask, f, dh, DOT)
            if HAS_BASE:
                sig = tl.sigmoid(s)
                base = tl.where(valid, s * sig, 0.0)
                dfb = tl.dot(dh, tl.load(coef_t + BROW * scm, mask=cmask_t, other=0.0), input_precision=DOT)
                ds += dfb * (sig * (1.0 + s * (1.0 - sig)))
                _add_feature_grad(dc_tile + BROW * sdm, seen, dmask, base, dh, DOT)
            ds = tl.where(valid, ds, 0.0)
            dk += tl.dot(tl.trans(ds), q.to(tl.float32), input_precision=DOT)
        tl.store(DK + bh * N * D + offs_n[:, None] * D + offs_d[None, :], dk * SCALE, mask=offs_n[:, None] < N)


def _pad(n: int, least: int = 16) -> int:
    return max(least, 1 << math.ceil(math.log2(max(n, 1))))


N_BUCKETS = (256, 1024, 4096)  # tokens up to each bound share a tuned configuration; more tokens: the last


def n_bucket(n: Optional[int]) -> int:
    """The bucket of :data:`N_BUCKETS` that ``n`` tokens fall in (``None``: the first)."""
    return next((b for b in N_BUCKETS if n is None or n <= b), N_BUCKETS[-1])


def _dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _flag_names(flags) -> Tuple[str, ...]:
    """The options that add code to a kernel (and so registers), from the kernels' flag dict or a tuple."""
    if isinstance(flags, dict):
        return tuple(k for k in ("HAS_BIAS", "HAS_REL", "HAS_MASK", "HAS_BASE", "SPLINE") if flags.get(k))
    return tuple(flags)


# Launch configurations (BM, BN, num_warps, num_stages), the default first, per kernel and kind of program,
# from the offline table (benchmarks/gpu_kernel_table.md, ``python -m tools.kernel_table --space``): the default
# is the one with the fewest instructions per logit among those that spill on neither sm_80 nor sm_90, unless
# every such one costs far more instructions (B-spline dk, head_dim 256 with G = 16: the fewest spills and
# instructions; tests/test_fused_compile.py holds their spills to a budget); the others are what a tuning run on
# a GPU should time.
# Kinds: "large" (head_dim > 128 or more than 33 features), "spline" (B-splines), "options" (a bias, a mask or the
# SiLU base), "plain"; "KIND-half", where listed, for bf16 / fp16 q, k. Eight warps on a 16- or 32-row tile
# duplicate the tensor-core and SFU work across warps (the table's MMA column doubles), so they serve only where
# four would spill.
_SPACE: Dict[Tuple[str, str], List[Tuple[int, int, int, int]]] = {
    ("_phi_fwd_kernel", "plain"): [(64, 32, 4, 2), (32, 32, 4, 3), (64, 64, 4, 2)],
    ("_phi_fwd_kernel", "options"): [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("_phi_fwd_kernel", "spline"): [(64, 16, 4, 2), (32, 16, 4, 2), (64, 32, 4, 2)],
    ("_phi_fwd_kernel", "large"): [(16, 16, 4, 2), (16, 16, 8, 2)],
    ("_phi_bwd_dq_kernel", "plain"): [(32, 32, 4, 2), (32, 32, 4, 3), (32, 64, 8, 2)],
    ("_phi_bwd_dq_kernel", "options"): [(32, 32, 8, 2), (32, 16, 4, 2)],
    ("_phi_bwd_dq_kernel", "spline"): [(16, 16, 4, 2), (32, 32, 4, 2), (32, 16, 8, 2)],
    ("_phi_bwd_dq_kernel", "large"): [(16, 16, 4, 2), (16, 16, 8, 2)],
    ("_phi_bwd_dk_kernel", "plain"): [(16, 32, 4, 2), (32, 16, 4, 2), (32, 32, 8, 2)],
    ("_phi_bwd_dk_kernel", "plain-half"): [(32, 16, 4, 2), (16, 32, 4, 2), (32, 32, 8, 2)],  # bf16 / fp16 q, k
    ("_phi_bwd_dk_kernel", "options"): [(16, 16, 4, 2), (16, 32, 8, 2)],
    ("_phi_bwd_dk_kernel", "spline"): [(16, 32, 4, 2), (16, 16, 8, 2), (32, 32, 4, 2)],
    ("_phi_bwd_dk_kernel", "large"): [(16, 16, 4, 2), (16, 16, 8, 2)],
}


def config_space(kernel: str, head_dim: int, features: int, rank: int, dtype: str, flags=()) -> List[dict]:
    """The launch configurations worth timing for one kernel (BM, BN, num_warps, num_stages), the default first
    (:data:`_SPACE`); ``flags``: the kernels' flag dict, or the names of the options that are on."""
    names = _flag_names(flags)
    kind = ("large" if head_dim > 128 or features > 33 else "spline" if "SPLINE" in names else
            "options" if names else "plain")
    configs = _SPACE.get((kernel, f"{kind}-half")) if dtype != "fp32" else None
    return [dict(BM=bm, BN=bn, num_warps=w, num_stages=st) for bm, bn, w, st in configs or _SPACE[(kernel, kind)]]


_TUNED: Dict[tuple, dict] = {}  # (kernel, head_dim, features, padded rank, dtype, flags, N bucket) -> configuration


def launch_config(kernel: str, head_dim: int, features: int, rank: int, dtype, n: Optional[int] = None,
                  flags=()) -> dict:
    """The launch configuration of ``kernel`` (a name of :data:`KERNELS`) for these shapes: the one recorded in
    the tuning cache for this key (head_dim, features, rank, dtype, options, N bucket), else the first of
    :func:`config_space` (deterministic, which the interpreter always takes)."""
    dtype = dtype if isinstance(dtype, str) else _dtype_name(dtype)
    flags = _flag_names(flags)
    head_dim, features, rank = int(head_dim), int(features), int(rank)  # shapes may be SymInts while tracing
    tuned = _TUNED.get((kernel, head_dim, features, _pad(rank), dtype, flags, n_bucket(n)))
    return dict(tuned or config_space(kernel, head_dim, features, rank, dtype, flags)[0])


def _basis_args(layer: nn.Module, grid: int) -> Tuple[float, float, int, int]:
    """(lo, 1 / h, B-spline order or 0 for Fourier, the base function's coefficient row) for the kernels."""
    basis = layer.basis
    if isinstance(basis, SplineBasis):
        return float(basis._lo), 1.0 / float(basis._step), basis.order, grid + basis.order
    return 0.0, 1.0, 0, 2 * grid


class _Extras:
    """The optional kernel inputs (dense bias, decomposed bias, mask) as pointer and stride arguments, with
    placeholders where absent (a compile-time flag keeps the kernels from touching them), and the basis's
    arguments (Fourier, or B-spline knots)."""

    def __init__(self, q: torch.Tensor, bias: Optional[torch.Tensor], rel_h: Optional[torch.Tensor],
                 rel_w: Optional[torch.Tensor], mask: Optional[torch.Tensor], layer: Optional[nn.Module], grid: int,
                 basis: Optional[Tuple[float, float, int, bool]] = None) -> None:
        # the basis from the KAN layer, or (lo, 1 / h, B-spline order or 0, has_base) where there is no layer (in
        # the operators of karat.kernels.fused_ops, which take numbers)
        b, h, n, _ = q.shape
        if layer is not None:
            lo, inv_h, spline, base_row = _basis_args(layer, grid)
            has_base = layer.has_base
        else:
            lo, inv_h, spline, has_base = basis
            base_row = grid + spline if spline else 2 * grid
        self.flags = dict(HAS_BIAS=bias is not None, HAS_REL=rel_h is not None, HAS_MASK=mask is not None,
                          HAS_BASE=has_base, SPLINE=spline, BROW=base_row)
        bias4 = bias.expand(b, h, n, n) if bias is not None else None
        mask4 = mask.view(torch.uint8).expand(b, h, n, n) if mask is not None else None  # a view, no copy
        self.kh, self.kw = (rel_h.shape[-1], rel_w.shape[-1]) if rel_h is not None else (1, 1)
        self.pointers = (q if bias4 is None else bias4, q if rel_h is None else rel_h, q if rel_w is None else rel_w,
                         q if mask4 is None else mask4)
        self.scalars = ((*(bias4.stride() if bias4 is not None else (0,) * 4), self.kh, self.kw,
                         *(mask4.stride() if mask4 is not None else (0,) * 4), lo, inv_h))


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where its last dim is contiguous (the kernels read (B, H, N, D) views, e.g. slices of a fused
    qkv, through their strides), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _phi_forward(q: torch.Tensor, k: torch.Tensor, coef: torch.Tensor, ex: _Extras, grid: int,
                 scale: float) -> torch.Tensor:
    """``H = Phi(scale q k^T + bias)``, (B, H, N, r) fp32, by the forward kernel; coef (H, N, r, M) fp32."""
    b, h, n, d = q.shape
    r = coef.shape[2]
    cfg = launch_config("_phi_fwd_kernel", d, coef.shape[3], r, q.dtype, n, ex.flags)
    out = torch.empty(b, h, n, r, device=q.device, dtype=torch.float32)
    _launch(_phi_fwd_kernel)[(triton.cdiv(n, cfg["BM"]), b * h)](
        q, k, coef, out, *ex.pointers, n, r, scale, *_qk_strides(q, k), *_coef_strides(coef),
        out.stride(1), out.stride(2), h, *ex.scalars, D=d, G=grid, RP=_pad(r), **cfg, DOT=DOT_PRECISION,
        **ex.flags)
    return out


def _phi_backward(q, k, coef, bias, rel_h, rel_w, ex: _Extras, grid: int, scale: float, dh: torch.Tensor,
                  need_bias: bool) -> tuple:
    """(dq, dk, dcoef, dbias, drel_h, drel_w) from ``dL/dH`` by the dq and dk kernels, all fp32."""
    b, h, n, d = q.shape
    r = coef.shape[2]
    cfg_q, cfg_k = (launch_config(name, d, coef.shape[3], r, q.dtype, n, ex.flags) for name in KERNELS[1:])
    dq = torch.empty(b, h, n, d, device=q.device, dtype=torch.float32)  # contiguous: the kernels' layout
    dk = torch.empty(b, h, n, d, device=q.device, dtype=torch.float32)
    # per-batch partials, laid out (B, H, N, r, M) like the basis coefficients, so their gradient needs no copy
    dc = torch.empty(b, h, n, r, coef.shape[3], device=q.device, dtype=torch.float32)
    db = torch.empty(b, h, n, n, device=q.device, dtype=torch.float32) if need_bias else q
    drh = torch.empty_like(rel_h, dtype=torch.float32) if rel_h is not None else q
    drw = torch.empty_like(rel_w, dtype=torch.float32) if rel_w is not None else q
    common = dict(D=d, G=grid, RP=_pad(r), DOT=DOT_PRECISION, **ex.flags)
    strides = (*_qk_strides(q, k), *_coef_strides(coef), dh.stride(1), dh.stride(2))
    _launch(_phi_bwd_dq_kernel)[(triton.cdiv(n, cfg_q["BM"]), b * h)](
        q, k, coef, dh, dq, *ex.pointers, db, drh, drw, n, r, scale, *strides, h, *ex.scalars,
        BIAS_GRAD=need_bias, KHP=_pad(ex.kh), KWP=_pad(ex.kw), **cfg_q, **common)
    _launch(_phi_bwd_dk_kernel)[(triton.cdiv(n, cfg_k["BN"]), b * h)](
        q, k, coef, dh, dk, dc, *ex.pointers, n, r, scale, *strides, dc.stride(1), dc.stride(2), dc.stride(4),
        dc.stride(3), h, *ex.scalars, **cfg_k, **common)
    return (dq, dk, dc[0] if b == 1 else dc.sum(0), efficient._sum_to(db, bias.shape) if need_bias else None,
            None if rel_h is None else drh, None if rel_w is None else drw)


def _coef_strides(coef: torch.Tensor) -> Tuple[int, int, int]:
    """(key, feature, rank) strides of the (H, N, r, M) coefficients, as the kernels take them."""
    return coef.stride(1), coef.stride(3), coef.stride(2)


def _qk_strides(q: torch.Tensor, k: torch.Tensor) -> Tuple[int, ...]:
    """(batch, head, token) strides of q and of k, as the kernels take them."""
    return (*q.stride()[:3], *k.stride()[:3])


def attend(op: KArAtOperator, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[Bias] = None,
           key_mask: Optional[torch.Tensor] = None, scale: float = 1.0) -> torch.Tensor:
    """``sigma(S) V = ((Phi(S) W^T) * mask) V`` of a ``phi1_w2`` operator by the fused kernels, in fp32 with autocast
    off; q, k may be half precision and strided views. The output comes back in the autocast dtype under autocast,
    else in q's dtype (``karat.precision``). ``karat.kernels.choose`` has checked :func:`supports` for this call."""
    dtype = output_dtype(q)
    phi = op.phi
    rel_h = rel_w = dense = None
    if isinstance(bias, DecomposedRelPos):
        rel_h, rel_w = (upcast(t).contiguous() for t in (bias.rel_h, bias.rel_w))
    elif bias is not None:
        dense = upcast(bias)
    lo, inv_h, spline, _ = _basis_args(phi, op.cfg.grid)
    with autocast_off(q.device.type):  # one operator, one autograd node (karat.kernels.fused_ops)
        out = fused_ops.attention(q, k, v, phi.basis.coefficients, phi.basis_scale, phi.base_weight, op.weight,
                                  dense, rel_h, rel_w, key_mask, op.cfg.grid, float(scale), lo, inv_h, spline)
    return out.to(dtype)


KERNELS = ("_phi_fwd_kernel", "_phi_bwd_dq_kernel", "_phi_bwd_dk_kernel")
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block (opt-in maximum)
_POINTERS = {"Q": None, "K": None, "BIAS": "*fp32", "RELH": "*fp32", "RELW": "*fp32", "MASK": "*u8"}
_FP32_POINTERS = ("C", "Hout", "DH", "DQ", "DK", "DC", "DB", "DRELH", "DRELW")


# What the offline compiles (tests/test_fused_compile.py, tools/kernel_table.py) cover, as (head_dim, G, r, q/k dtype,
# flags): the plain ViT kernel, in fp32 and in bf16 (autocast training); every flag at once (bias, decomposed
# rel-pos, mask, SiLU base: each adds code, none removes any); the largest program (head_dim 256, G = 16) with every
# flag; cubic B-splines with every flag.
SHIPPED_VARIANTS = {
    "plain": (64, 3, 12, "fp32", {}),
    "plain-bf16": (64, 3, 12, "bf16", {}),
    "all-flags": (64, 3, 12, "bf16", dict(bias=True, relpos=True, mask=True, base=True)),
    "d256-g16-all-flags": (256, 16, 16, "fp16", dict(bias=True, relpos=True, mask=True, base=True)),
    "bspline-all-flags": (64, 5, 12, "bf16", dict(spline=3, bias=True, relpos=True, mask=True, base=True)),
}
# Bytes of register spill stores a shipped variant's kernel may have on sm_80 or sm_90 (any other kernel: none),
# as measured in benchmarks/gpu_kernel_table.md with some headroom: the dq and dk programs of head_dim 256 with
# G = 16 and every option hold more live tiles than 255 registers (a split of the head dim across programs would
# fix it); B-spline dk spills 32-188 bytes at its default, against 3x the instructions per logit at the
# configuration that does not spill.
SPILL_BUDGET = {("d256-g16-all-flags", "_phi_bwd_dq_kernel"): 256, ("d256-g16-all-flags", "_phi_bwd_dk_kernel"): 1280,
                ("bspline-all-flags", "_phi_bwd_dk_kernel"): 256}


def compile_offline(arch: int, head_dim: int, grid: int, rank: int, dtype: str = "fp32", *, bias: bool = False,
                    relpos: bool = False, mask: bool = False, base: bool = False, spline: int = 0,
                    configs: Optional[Dict[str, dict]] = None, kernels: Sequence[str] = (),
                    space: bool = False) -> dict:
    """Compile the three kernels of one variant for ``sm_<arch>`` without a GPU (Triton's bundled ptxas):
    ``{kernel name: shared memory bytes}``. Compile errors and shared-memory overruns show up on any machine;
    ``offline.stats_of(compile_offline, ...)`` reads registers, spills and the instruction mix of the same compile.
    ``dtype`` is that of q and k (``fp32``, ``bf16``, ``fp16``); ``spline`` a B-spline order (0: Fourier);
    ``configs`` a launch configuration per kernel name (default: :func:`launch_config`'s); ``kernels`` the names
    to compile (default: all of :data:`KERNELS`); ``space``: compile every configuration of
    :func:`config_space` instead (the default first), ``{kernel name: [shared memory bytes, ...]}``."""
    from . import offline

    features = (grid + spline if spline else 2 * grid)
    flags = dict(HAS_BIAS=bias, HAS_REL=relpos, HAS_MASK=mask, HAS_BASE=base, SPLINE=spline, BROW=features)
    const = dict(D=head_dim, G=grid, RP=_pad(rank), DOT=DOT_PRECISION, BIAS_GRAD=bias,
                 KHP=64 if relpos else 16, KWP=64 if relpos else 16, **flags)
    shared = {}
    for name in kernels or KERNELS:
        kernel = globals()[name]
        sig = {}
        for a in kernel.arg_names:
            if a in const:
                sig[a] = "constexpr"
            elif a in _POINTERS:
                sig[a] = _POINTERS[a] or f"*{dtype}"
            else:
                sig[a] = "*fp32" if a in _FP32_POINTERS else "fp32" if a in ("LO", "INVH", "SCALE") else "i32"
        default = (configs or {}).get(name) or launch_config(name, head_dim, features + int(base), rank, dtype,
                                                             flags=flags)
        todo = config_space(name, head_dim, features + int(base), rank, dtype, flags) if space else [default]
        for cfg in map(dict, todo):
            options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            compiled = offline.compile_kernel(kernel, sig, {**const, **cfg}, arch, **options)
            used = compiled.metadata.shared
            shared.setdefault(name, []).append(used)
            limit = SHARED_MEMORY_LIMIT.get(arch, 101376)
            if "cubin" not in compiled.asm or used > limit:
                raise RuntimeError(f"{name} for sm_{arch} (head_dim {head_dim}, G {grid}, {dtype}, {flags}, "
                                   f"{cfg}, {options}): {used} bytes of shared memory, limit {limit}")
    return shared if space else {name: used[0] for name, used in shared.items()}

