"""Fused Triton kernels for ``phi1_w2`` with the Fourier basis (the paper's headline setting).

Flash-attention style: tiles of ``S = q k^T`` are recomputed from ``q`` and ``k`` in registers and never
written to memory, and so are their Fourier features (``cos kS``, ``sin kS`` by the angle-addition
recurrence from one ``cos`` and one ``sin``). Memory is O(N (r + d)) per head.

* forward: one program per (query block, batch x head) accumulates ``H = Phi(S)`` (N x r);
* backward, ``dq``: one program per (query block, batch x head) loops over key blocks;
* backward, ``dk`` and the coefficient gradient: one program per (key block, batch x head) loops over query
  blocks and writes its partial coefficient gradient for that batch element; the batch partials are summed
  afterwards, so no gradient needs one atomic add per element.

The kernels serve the zero base with neither mask nor bias (the plain ViT case); ``supports`` says what else
falls back to ``karat.kernels.efficient``. Tested on the CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

try:  # Triton ships with CUDA builds of torch; the core works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

from ..bases import FourierBasis
from ..operator import KArAtOperator
from ..precision import autocast_off, output_dtype, upcast


_DISABLED: Optional[str] = None


def disable(reason: str) -> None:
    """Stop ``impl='auto'`` from choosing the fused kernels in this process (after they failed to run)."""
    global _DISABLED
    if _DISABLED is None:
        warnings.warn(f"KArAt fused kernels disabled, falling back to the efficient PyTorch path: {reason}")
    _DISABLED = reason


def supports(op: KArAtOperator, q: torch.Tensor, bias: Optional[torch.Tensor],
             key_mask: Optional[torch.Tensor]) -> Optional[str]:
    """None when the fused kernels can evaluate this call, else the reason."""
    if triton is None:
        return "Triton is not installed"
    if _DISABLED is not None:
        return f"the fused kernels failed earlier in this process ({_DISABLED})"
    if op.mode != "phi1_w2" or not isinstance(op.phi.basis, FourierBasis):
        return "the fused kernels cover phi1_w2 with the Fourier basis"
    if op.cfg.project_l1:
        return "project_l1 needs the materialised sigma(S)"
    if op.phi.has_base:
        return "the fused kernels cover the zero base (base_fn='ZeroModule')"
    if bias is not None or key_mask is not None:
        return "the fused kernels take neither a relative-position bias nor a mask"
    if q.shape[-1] < 16 or q.shape[-1] & (q.shape[-1] - 1):
        return f"head_dim {q.shape[-1]} must be a power of two >= 16"
    if not (q.is_cuda or _interpreting()):
        return "the fused kernels run on CUDA (or under TRITON_INTERPRET=1)"
    return None


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _rows(P, bh, sb, sn, offs, offs_d, N):
        """A (rows, D) tile of a (B*H, N, D) tensor in fp32; rows past N read as zeros."""
        return tl.load(P + bh * sb + offs[:, None] * sn + offs_d[None, :], mask=offs[:, None] < N,
                       other=0.0).to(tl.float32)

    @triton.jit
    def _cols(P, bh, sb, sn, offs, offs_d, N):
        """The same tile transposed, (D, cols), as the right operand of ``q k^T``."""
        return tl.load(P + bh * sb + offs[None, :] * sn + offs_d[:, None], mask=offs[None, :] < N,
                       other=0.0).to(tl.float32)

    @triton.jit
    def _phi_fwd_kernel(Q, K, C, Hout, N, R, sqb, sqn, skb, skn, scj, scm, shb, shn, heads,
                        D: tl.constexpr, G: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % heads
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        offs_r = tl.arange(0, RP)
        q = _rows(Q, bh, sqb, sqn, offs_m, offs_d, N)
        acc = tl.zeros((BM, RP), dtype=tl.float32)
        c_head = C + h * N * scj
        for j0 in range(0, N, BN):
            offs_n = j0 + tl.arange(0, BN)
            kt = _cols(K, bh, skb, skn, offs_n, offs_d, N)
            s = tl.dot(q, kt, input_precision="ieee")
            c1 = tl.cos(s)
            s1 = tl.sin(s)
            ck = c1
            sk = s1
            cmask = (offs_n[:, None] < N) & (offs_r[None, :] < R)
            for g in tl.static_range(G):
                cc = tl.load(c_head + offs_n[:, None] * scj + g * scm + offs_r[None, :], mask=cmask, other=0.0)
                cs = tl.load(c_head + offs_n[:, None] * scj + (G + g) * scm + offs_r[None, :], mask=cmask, other=0.0)
                acc += tl.dot(ck, cc) + tl.dot(sk, cs)
                ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        tl.store(Hout + bh * shb + offs_m[:, None] * shn + offs_r[None, :], acc,
                 mask=(offs_m[:, None] < N) & (offs_r[None, :] < R))

    @triton.jit
    def _dscore(q, kt, dh, c_head, offs_n, offs_r, N, R, scj, scm, G: tl.constexpr):
        """Recompute the S tile of (query block, key block) and return dL/dS for it."""
        s = tl.dot(q, kt, input_precision="ieee")
        c1 = tl.cos(s)
        s1 = tl.sin(s)
        ck = c1
        sk = s1
        ds = tl.zeros_like(s)
        cmask = (offs_n[None, :] < N) & (offs_r[:, None] < R)
        for g in tl.static_range(G):
            cct = tl.load(c_head + offs_n[None, :] * scj + g * scm + offs_r[:, None], mask=cmask, other=0.0)
            cst = tl.load(c_head + offs_n[None, :] * scj + (G + g) * scm + offs_r[:, None], mask=cmask, other=0.0)
            dfc = tl.dot(dh, cct)  # (BM, BN): sum_p dH_ip C[j, g, p]
            dfs = tl.dot(dh, cst)
            ds += (g + 1.0) * (dfs * ck - dfc * sk)
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        return ds

    @triton.jit
    def _phi_bwd_dq_kernel(Q, K, C, DH, DQ, N, R, sqb, sqn, skb, skn, scj, scm, shb, shn, heads,
                           D: tl.constexpr, G: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % heads
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        offs_r = tl.arange(0, RP)
        mrow = offs_m[:, None] < N
        q = _rows(Q, bh, sqb, sqn, offs_m, offs_d, N)
        dh = tl.load(DH + bh * shb + offs_m[:, None] * shn + offs_r[None, :], mask=mrow & (offs_r[None, :] < R),
                     other=0.0)
        dq = tl.zeros((BM, D), dtype=tl.float32)
        c_head = C + h * N * scj
        for j0 in range(0, N, BN):
            offs_n = j0 + tl.arange(0, BN)
            kt = _cols(K, bh, skb, skn, offs_n, offs_d, N)
            ds = _dscore(q, kt, dh, c_head, offs_n, offs_r, N, R, scj, scm, G)
            dq += tl.dot(ds, tl.trans(kt))
        tl.store(DQ + bh * sqb + offs_m[:, None] * sqn + offs_d[None, :], dq, mask=mrow)

    @triton.jit
    def _phi_bwd_dk_kernel(Q, K, C, DH, DK, DC, N, R, sqb, sqn, skb, skn, scj, scm, shb, shn, sdb, sdj, sdm, heads,
                           D: tl.constexpr, G: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % heads
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        offs_r = tl.arange(0, RP)
        kt = _cols(K, bh, skb, skn, offs_n, offs_d, N)
        dk = tl.zeros((BN, D), dtype=tl.float32)
        c_head = C + h * N * scj
        cmask_t = (offs_n[None, :] < N) & (offs_r[:, None] < R)
        dmask = (offs_n[:, None] < N) & (offs_r[None, :] < R)
        dc_tile = DC + bh * sdb + offs_n[:, None] * sdj + offs_r[None, :]
        for i0 in range(0, N, BM):
            offs_m = i0 + tl.arange(0, BM)
            mrow = offs_m[:, None] < N
            q = _rows(Q, bh, sqb, sqn, offs_m, offs_d, N)
            dh = tl.load(DH + bh * shb + offs_m[:, None] * shn + offs_r[None, :], mask=mrow & (offs_r[None, :] < R),
                         other=0.0)
            s = tl.dot(q, kt, input_precision="ieee")
            c1 = tl.cos(s)
            s1 = tl.sin(s)
            ck = c1
            sk = s1
            ds = tl.zeros_like(s)
            for g in tl.static_range(G):
                cct = tl.load(c_head + offs_n[None, :] * scj + g * scm + offs_r[:, None], mask=cmask_t, other=0.0)
                cst = tl.load(c_head + offs_n[None, :] * scj + (G + g) * scm + offs_r[:, None], mask=cmask_t, other=0.0)
                ds += (g + 1.0) * (tl.dot(dh, cst) * ck - tl.dot(dh, cct) * sk)
                # this program owns its key block's coefficient-gradient rows: load, add, store (no atomics)
                ckm = tl.where(mrow, ck, 0.0)
                skm = tl.where(mrow, sk, 0.0)
                tl.store(dc_tile + g * sdm,
                         tl.load(dc_tile + g * sdm, mask=dmask, other=0.0) + tl.dot(tl.trans(ckm), dh), mask=dmask)
                tl.store(dc_tile + (G + g) * sdm,
                         tl.load(dc_tile + (G + g) * sdm, mask=dmask, other=0.0) + tl.dot(tl.trans(skm), dh),
                         mask=dmask)
                ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
            dk += tl.dot(tl.trans(ds), q)
        tl.store(DK + bh * skb + offs_n[:, None] * skn + offs_d[None, :], dk, mask=offs_n[:, None] < N)


def _pad_r(r: int) -> int:
    return max(16, 1 << math.ceil(math.log2(r)))


class _FusedPhi(torch.autograd.Function):
    """``H = Phi(q k^T)`` for the Fourier basis without materialising S (forward and backward in Triton)."""

    @staticmethod
    def forward(ctx, q, k, coef, grid, block_m, block_n):
        # q, k: (B, H, N, D) (q pre-scaled); coef: (H, N, 2G, r) contiguous
        b, h, n, d = q.shape
        r = coef.shape[-1]
        q, k, coef = q.contiguous(), k.contiguous(), coef.contiguous()
        out = torch.empty(b, h, n, r, device=q.device, dtype=torch.float32)
        launch = (triton.cdiv(n, block_m), b * h)
        _phi_fwd_kernel[launch](q, k, coef, out, n, r, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
                                coef.stride(1), coef.stride(2), out.stride(1), out.stride(2), h,
                                D=d, G=grid, RP=_pad_r(r), BM=block_m, BN=block_n)
        ctx.save_for_backward(q, k, coef)
        ctx.grid, ctx.block_m, ctx.block_n = grid, block_m, block_n
        return out.to(torch.promote_types(q.dtype, torch.float32))  # half-precision q, k: H stays fp32

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        q, k, coef = ctx.saved_tensors
        b, h, n, d = q.shape
        r = coef.shape[-1]
        dh = dh.contiguous().float()
        dq = torch.empty_like(q, dtype=torch.float32)
        dk = torch.empty_like(k, dtype=torch.float32)
        dc = torch.zeros(b, h, n, coef.shape[2], r, device=q.device, dtype=torch.float32)  # per-batch partials
        common = dict(D=d, G=ctx.grid, RP=_pad_r(r), BM=ctx.block_m, BN=ctx.block_n)
        _phi_bwd_dq_kernel[(triton.cdiv(n, ctx.block_m), b * h)](
            q, k, coef, dh, dq, n, r, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
            coef.stride(1), coef.stride(2), dh.stride(1), dh.stride(2), h, **common)
        _phi_bwd_dk_kernel[(triton.cdiv(n, ctx.block_n), b * h)](
            q, k, coef, dh, dk, dc, n, r, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
            coef.stride(1), coef.stride(2), dh.stride(1), dh.stride(2),
            dc.stride(1), dc.stride(2), dc.stride(3), h, **common)
        return dq.to(q.dtype), dk.to(k.dtype), dc.sum(0).to(coef.dtype), None, None, None


def phi_fused(op: KArAtOperator, q: torch.Tensor, k: torch.Tensor, block_m: int = 32,
              block_n: int = 32) -> torch.Tensor:
    """``Phi(q k^T)`` (N x r per head) of a ``phi1_w2`` Fourier operator, q already scaled. q and k may be half
    precision (the kernels load them as fp32); the coefficients go in, and H comes out, in fp32."""
    from .efficient import _layer_coefficients

    coef = _layer_coefficients(op.phi).to(torch.float32)
    return _FusedPhi.apply(q, k, coef, op.cfg.grid, block_m, block_n)


def attend(op: KArAtOperator, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           bias: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
           scale: float = 1.0) -> torch.Tensor:
    """``sigma(S) V = Phi(S) (W^T V)`` with ``Phi(S)`` from the fused kernels, in fp32 with autocast off; the
    output comes back in the autocast dtype under autocast, else in q's dtype (``karat.precision``)."""
    reason = supports(op, q, bias, key_mask)
    if reason is not None:
        raise ValueError(f"impl='fused' cannot serve this call: {reason}. Use impl='auto' or 'efficient'.")
    dtype = output_dtype(q)
    with autocast_off(q.device.type):
        hidden = phi_fused(op, q * scale, k)
        return (hidden @ torch.einsum("hjr,bhjd->bhrd", op.weight.to(hidden.dtype), upcast(v))).to(dtype)
