"""Memory-efficient evaluation of ``sigma(S) V`` without building ``sigma(S)`` (spec section 5).

Two building blocks cover every supported configuration:

* reduce over keys, ``Phi(S)``: a KAN layer N -> r applied to the rows of ``S``. For shared-feature bases
  (Fourier, B-spline) ``reduce_keys_qk`` is a custom autograd function that recomputes each key block's
  logits from ``q, k`` and their features in forward and backward, so neither ``S`` nor the
  ``N x N x M`` feature tensor is ever stored; per-edge bases (wavelets, rationals) use ``reduce_keys``,
  which sums key blocks of the materialised logits under activation checkpointing.
* expand to keys, ``expand_to_keys``: a KAN layer r -> N whose outputs weight the values,
  ``out = sigma V`` with ``sigma_ij = sum_p phi_pj(U_ip)``. For a shared-feature basis and key-level masks it
  is linear in N, ``out = F(U) (C V)``; otherwise it runs over key blocks under checkpointing.

``phi1_w2`` is a key reduction followed by ``H (W^T V)``; ``w1_phi2`` is ``U = q (W k)^T`` followed by an
expansion; the non-modular depth-2 operator is a reduction followed by an expansion.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from . import fused_cpu, onnx_export
from ..bases import FourierBasis, SharedFeatureBasis
from ..kan import KANLayer
from ..operator import KArAtOperator
from ..precision import autocast_off, full_precision_attention
from ..relpos import Bias, dense_bias

KEY_BLOCK: Optional[int] = None  # keys per block; None sizes blocks to BLOCK_ELEMENTS
BLOCK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 25}  # feature entries of one block (bounds the transient memory)


def supports(op: KArAtOperator) -> Optional[str]:
    """None when the efficient path can evaluate ``op``, else the reason it cannot."""
    if op.cfg.project_l1:
        return "project_l1 needs every row of sigma(S) to project it onto the simplex"
    if op.mode == "depth" and len(op.layers) != 2:
        return f"a non-modular operator of depth {len(op.layers)} (only depth 2 factorises through rank r)"
    return None


def _blocks(n: int, block: int):
    if onnx_export.symbolic_keys(n):  # a key count known when the exported graph runs: one block
        return [slice(None)]
    return [slice(j, min(j + block, n)) for j in range(0, n, block)]


def block_size(rows: int, width: int, n: int, device: torch.device) -> int:
    """Keys per block so that ``rows x block x width`` feature entries stay within the device's budget."""
    if KEY_BLOCK:
        return KEY_BLOCK
    if onnx_export.exporting():  # a fixed key loop, whatever the (dynamic) batch size
        return onnx_export.block_size(n, width)
    budget = BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cuda"])
    return max(8, min(n, budget // max(1, rows * width)))


def _maybe_checkpoint(fn, *args):
    if torch.is_grad_enabled() and not onnx_export.exporting() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _is_key_level(mask: Optional[torch.Tensor]) -> bool:
    """A mask that is the same for every query (padding), shape ``(..., 1, N)``."""
    return mask is None or mask.shape[-2] == 1


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to ``shape`` (the shape of the tensor that was broadcast)."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


class _ReduceKeysFromQK(torch.autograd.Function):
    """``Phi(S)`` for a shared-feature KAN layer, with ``S = q k^T (+ bias)`` recomputed block by block.

    Neither ``S`` nor its ``N x N x M`` features are ever stored: forward keeps ``q, k`` (and the bias the
    host already holds); backward recomputes each key block's logits and features and accumulates
    ``dq``, ``dk``, the coefficient gradient and the bias gradient. Memory O(N (r + d)) per head plus one block.
    """

    # Work is laid out head-major, (H, B, N, ...), so that every contraction with the per-head coefficients
    # is one large (B*N rows) matrix product per head.

    @staticmethod
    def forward(ctx, q, k, bias, coef, layer, key_mask, block, scale):
        ctx.save_for_backward(q, k, bias, coef, key_mask)
        ctx.layer, ctx.block, ctx.scale = layer, block, scale
        return _reduce_blocks(q, k, bias, coef, layer, key_mask, block, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        with autocast_off(dy.device.type):  # backward may run inside the caller's autocast region (CPU)
            return _ReduceKeysFromQK._backward(ctx, dy.to(ctx.saved_tensors[0].dtype))

    @staticmethod
    def _backward(ctx, dy):
        q, k, bias, coef, key_mask = ctx.saved_tensors
        need_q, need_k, need_bias, need_coef = ctx.needs_input_grad[:4]
        qh, kh = _head_major(q, ctx.scale), _head_major(k)
        bh, mh = (None if t is None else t.transpose(0, 1) for t in (bias, key_mask))
        h, b, n = qh.shape[:3]
        dq = torch.zeros_like(qh) if need_q else None
        dk = torch.zeros_like(kh) if need_k else None
        dbias = torch.zeros_like(bias) if need_bias else None
        dbh = None if dbias is None else dbias.transpose(0, 1)
        dcoef = torch.zeros_like(coef) if need_coef else None
        dyh = dy.transpose(0, 1).reshape(h, b * n, -1)
        layer = ctx.layer
        # Fourier: every derivative is a scaled feature, so dL/dS = <dy C_rot^T, features> needs no new cos/sin.
        dmap = None if layer.has_base else layer.basis.derivative_map()
        if dmap is not None:
            perm, scale = dmap
            perm = perm.to(coef.device)
            coef_rot = coef[:, :, perm] * scale.to(coef)[perm][:, None]  # row m: C_perm(m) * scale_perm(m)
        for j in _blocks(k.shape[-2], ctx.block):
            s, mask, feats = _block_features(layer, qh, kh, bh, mh, j, return_logits=True)
            flat = feats.view(h, b * n, -1)  # (H, B*N, bk*M)
            if need_coef:
                dcoef[:, j] = (flat.transpose(1, 2) @ dyh).view_as(dcoef[:, j])
            if dmap is not None:
                drot = (dyh @ coef_rot[:, j].flatten(1, 2).transpose(1, 2)).view_as(feats)
                ds = torch.linalg.vecdot(drot, feats)  # masked entries have zero features: zero gradient
            else:
                dfeats = (dyh @ coef[:, j].flatten(1, 2).transpose(1, 2)).view_as(feats)
                ds = _features_vjp(layer, s, mask, dfeats)  # (H, B, N, bk)
            if need_q:
                dq += ds @ kh[..., j, :]
            if need_k:
                dk[..., j, :] = ds.transpose(-2, -1) @ qh
            if need_bias:
                dbh[..., j] = _sum_to(ds, dbh[..., j].shape)
        # dq was accumulated with respect to the scaled q; dk already against the scaled q
        return (None if dq is None else dq.mul_(ctx.scale).transpose(0, 1), None if dk is None else dk.transpose(0, 1),
                dbias, dcoef, None, None, None, None)


def _reduce_blocks(q, k, bias, coef, layer, key_mask, block: int, scale: float) -> torch.Tensor:
    """The forward of ``_ReduceKeysFromQK``: q, k ``(B, H, N, d)``,
    ``S = scale q k^T (+ bias)``, coef ``(H, N, M, r)`` from ``_layer_coefficients(layer)``. The scale is applied
    here, so that the q saved for backward is the caller's (no scaled copy kept)."""
    qh, kh = _head_major(q, scale), _head_major(k)
    bh, mh = (None if t is None else t.transpose(0, 1) for t in (bias, key_mask))
    h, b, n = qh.shape[:3]
    out = q.new_zeros(h, b * n, coef.shape[-1])
    for j in _blocks(k.shape[-2], block):
        out.baddbmm_(_block_features(layer, qh, kh, bh, mh, j).view(h, b * n, -1), coef[:, j].flatten(1, 2))
    return out.view(h, b, n, -1).transpose(0, 1)


def _head_major(t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * t`` as a contiguous ``(H, B, ...)`` tensor: one copy instead of one per key block."""
    t = t.transpose(0, 1)
    if torch.compiler.is_compiling() or onnx_export.exporting():  # traces record no out= tensors
        return (t * scale).contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return torch.mul(t, scale, out=out) if scale != 1.0 else out.copy_(t)


def _block_features(layer, qh, kh, bh, mh, j, return_logits: bool = False):
    """Logits of key block ``j`` recomputed from q, k (head-major) and their masked features."""
    s = qh @ kh[..., j, :].transpose(-2, -1)
    if bh is not None:
        s = s + bh[..., j]
    mask = None if mh is None else mh[..., j]
    feats = _features(layer, s, mask)
    return (s, mask, feats) if return_logits else feats


def _features(layer: KANLayer, s: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Features of a shared-feature KAN layer at ``s``, the base activation as one extra feature, masked."""
    traced = torch.compiler.is_compiling() or onnx_export.exporting()  # fast_features writes into out= views
    feats = layer.basis.features(s) if traced else layer.basis.fast_features(s)
    if layer.has_base:
        feats = torch.cat([feats, layer.base_fn(s).unsqueeze(-1)], dim=-1)
    if mask is not None:
        feats = feats * mask.unsqueeze(-1).to(feats.dtype)
    return feats


def _features_vjp(layer: KANLayer, s: torch.Tensor, mask: Optional[torch.Tensor], dfeats: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to ``s`` of ``sum(dfeats * _features(layer, s, mask))``."""
    m = layer.basis.num_functions
    ds = layer.basis.features_vjp(s, dfeats[..., :m])
    if layer.has_base:
        with torch.enable_grad():
            s_ = s.detach().requires_grad_()
            ds = ds + torch.autograd.grad(layer.base_fn(s_), s_, dfeats[..., m])[0]
    if mask is not None:  # masked entries are constant zeros; the basis vjp may not know it
        ds = ds * mask.to(ds.dtype)
    return ds


def _layer_coefficients(layer: KANLayer) -> torch.Tensor:
    """``(H, in, M(+1), out)``: basis coefficients times ``w_s`` (and ``w_b`` for the base feature)."""
    coef = layer.basis.coefficients * layer.basis_scale.unsqueeze(-1)  # (H, in, out, M)
    if layer.has_base:
        coef = torch.cat([coef, layer.base_weight.unsqueeze(-1)], dim=-1)
    return coef.transpose(-1, -2).contiguous()


def _fused_cpu(layer: KANLayer, q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor],
               key_mask: Optional[torch.Tensor]) -> bool:
    """Whether the fused CPU kernel (``karat.kernels.fused_cpu``) serves this call: Fourier, no base, fp32/float64, a
    floating bias and a bool mask if any. Its threads' coefficient gradients are summed in a fixed order (the same
    bits for the same inputs and thread count); ``torch.use_deterministic_algorithms`` still keeps the PyTorch path.
    Never while ``torch.onnx.export`` runs: no exporter knows its custom op."""
    return (q.device.type == "cpu" and not onnx_export.exporting() and isinstance(layer.basis, FourierBasis)
            and not layer.has_base
            and not torch.are_deterministic_algorithms_enabled()
            and (bias is None or (bias.device.type == "cpu" and bias.is_floating_point()))
            and (key_mask is None or (key_mask.device.type == "cpu" and key_mask.dtype == torch.bool))
            and q.dtype == k.dtype and q.dtype in (torch.float32, torch.float64)
            and fused_cpu.available())


def _expanded(t: Optional[torch.Tensor], shape: torch.Size, dtype: Optional[torch.dtype] = None):
    """``t`` as a ``shape`` view (stride 0 where it broadcasts, no copy), for the fused kernel."""
    if t is None:
        return None
    return (t if dtype is None else t.to(dtype)).expand(shape)


def detail(op: KArAtOperator, q: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           key_mask: Optional[torch.Tensor]) -> str:
    """How this path evaluates the call: the C++ CPU kernel or PyTorch, blockwise."""
    first = op.phi if op.mode == "phi1_w2" else op.layers[0] if op.mode == "depth" else None
    if (q is not None and first is not None and isinstance(first.basis, SharedFeatureBasis)
            and _fused_cpu(first, q, q, bias, key_mask)):
        return "C++ CPU kernel"
    return "PyTorch, blockwise"


def reduce_keys_qk(layer: KANLayer, q: torch.Tensor, k: torch.Tensor, bias: Optional[Bias],
                   key_mask: Optional[torch.Tensor], scale: float = 1.0, block: Optional[int] = None) -> torch.Tensor:
    """``Phi(scale q k^T + bias)`` without storing the logits or their features (shared-feature bases)."""
    if onnx_export.exporting():  # exporters record plain ops, not an autograd.Function or a custom op
        return onnx_export.reduce_keys(layer, q, k, bias, key_mask, _layer_coefficients(layer).to(q.dtype), scale)
    bias = dense_bias(bias)
    if bias is not None and bias.dim() < 4:
        bias = bias.expand(*([1] * (4 - bias.dim())), *bias.shape)
    coef = _layer_coefficients(layer).to(q.dtype)
    if _fused_cpu(layer, q, k, bias, key_mask):
        shape = torch.Size((*q.shape[:-1], k.shape[-2]))
        # the expand's backward sums the kernel's dense dL/dS back to the bias's own shape
        return fused_cpu.fourier_reduce(q, k, coef, float(scale), layer.basis.grid, _expanded(bias, shape, q.dtype),
                                        _expanded(key_mask, shape))
    width = layer.basis.num_functions + int(layer.has_base)
    block = block or block_size(q.shape[0] * q.shape[1] * q.shape[2], width, k.shape[-2], q.device)
    return _ReduceKeysFromQK.apply(q, k, bias, coef, layer, key_mask, block, scale)


def reduce_keys(layer: KANLayer, logits: torch.Tensor, key_mask: Optional[torch.Tensor],
                block: Optional[int] = None) -> torch.Tensor:
    """``Phi(S)``: ``(B, H, N_q, N) -> (B, H, N_q, r)``, summed over key blocks recomputed in backward."""
    out = None
    block = block or block_size(logits.numel() // logits.shape[-1], layer.out_features, logits.shape[-1], logits.device)
    for j in _blocks(logits.shape[-1], block):
        m = None if key_mask is None else key_mask[..., j]

        def part(s_blk, _j=j, _m=m):
            return layer(s_blk, _m, edges=(_j, slice(None)))

        y = _maybe_checkpoint(part, logits[..., j])
        out = y if out is None else out + y
    return out


def expand_to_keys(layer: KANLayer, u: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                   block: Optional[int] = None) -> torch.Tensor:
    """``sigma V`` with ``sigma_ij = mask_ij sum_p phi_pj(U_ip)``: u ``(B, H, N_q, r)``, v ``(B, H, N, d)``."""
    if isinstance(layer.basis, SharedFeatureBasis) and _is_key_level(key_mask):
        vm = _masked_rows(v, key_mask)
        basis = layer.basis
        coef = (basis.coefficients * layer.basis_scale.unsqueeze(-1)).to(vm.dtype)  # (H, r, N, M)
        cv = torch.einsum("hpjm,bhjd->bhpmd", coef, vm)
        out = torch.einsum("bhipm,bhpmd->bhid", basis.features(u), cv)
        if layer.has_base:
            wv = torch.einsum("hpj,bhjd->bhpd", layer.base_weight.to(vm.dtype), vm)
            out = out + torch.einsum("bhip,bhpd->bhid", layer.base_fn(u), wv)
        return out
    out = None
    block = block or block_size(u.numel() // u.shape[-1], u.shape[-1], v.shape[-2], v.device)
    for j in _blocks(v.shape[-2], block):
        m = None if key_mask is None else key_mask[..., j]

        def part(u_, v_blk, _j=j, _m=m):
            sigma = layer(u_, edges=(slice(None), _j))
            if _m is not None:
                sigma = sigma * _m.to(sigma.dtype)
            return sigma @ v_blk

        y = _maybe_checkpoint(part, u, v[..., j, :])
        out = y if out is None else out + y
    return out


def _masked_rows(t: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero the key rows of ``t`` (``(B, H, N, d)``) that a key-level mask ``(.., 1, N)`` masks."""
    return t if key_mask is None else t * key_mask.transpose(-1, -2).to(t.dtype)


def _logits(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    s = q @ k.transpose(-2, -1)
    return s if bias is None else s + bias


def _attend_w1_phi2(op: KArAtOperator, q, k, v, bias, key_mask) -> torch.Tensor:
    weight = op.weight.to(q.dtype)
    if _is_key_level(key_mask):
        # U = S W^T = q (W k)^T (+ bias W^T): linear in N, no N x N logits unless the host gave a bias.
        u = q @ torch.einsum("hrj,bhjd->bhrd", weight, _masked_rows(k, key_mask)).transpose(-1, -2)
        if bias is not None:
            b = bias if key_mask is None else bias * key_mask.to(bias.dtype)
            u = u + torch.einsum("bhij,hrj->bhir", b.expand(*q.shape[:2], *b.shape[-2:]), weight)
    else:  # a per-query mask: U needs the masked logits
        s = _logits(q, k, bias)
        u = torch.einsum("bhij,hrj->bhir", s * key_mask.to(s.dtype), weight)
    return expand_to_keys(op.phi, u, v, key_mask)


@full_precision_attention
def attend(op: KArAtOperator, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[Bias] = None,
           key_mask: Optional[torch.Tensor] = None, scale: float = 1.0) -> torch.Tensor:
    """``sigma(S) V`` with ``S = scale q k^T (+ bias)``, without materialising ``sigma(S)``.

    The same function as the reference path (tests check it in float64). Computed in fp32 with autocast off
    (``karat.precision``); the output comes back in the autocast dtype under autocast, else in q's dtype."""
    reason = supports(op)
    if reason is not None:
        raise ValueError(f"impl='efficient' cannot evaluate {reason}; use impl='reference' or 'auto'.")
    if k.shape[-2] != op.num_tokens:
        raise ValueError(f"KArAt operator was built for {op.num_tokens} key tokens but got {k.shape[-2]}.")
    if op.mode == "w1_phi2":
        return _attend_w1_phi2(op, q * scale, k, v, dense_bias(bias), key_mask)
    first = op.phi if op.mode == "phi1_w2" else op.layers[0]
    if isinstance(first.basis, SharedFeatureBasis):
        hidden = reduce_keys_qk(first, q, k, bias, key_mask, scale)  # a decomposed bias stays so under export
    else:
        hidden = reduce_keys(first, _logits(q * scale, k, dense_bias(bias)), key_mask)
    if op.mode == "depth":
        return expand_to_keys(op.layers[1], hidden, v, key_mask)
    return expand_rank(op, hidden, v, key_mask)


def expand_rank(op: KArAtOperator, hidden: torch.Tensor, v: torch.Tensor,
                key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``phi1_w2``'s ``sigma V = ((H W^T) * mask) V`` from ``H = Phi(S)``: ``H (W^T V)``, linear in N, unless a
    per-query mask needs the N x N product."""
    weight = op.weight.to(hidden.dtype)
    if _is_key_level(key_mask):
        vm = _masked_rows(v, key_mask)
        if onnx_export.exporting():  # the same product as a MatMul: ONNX Runtime's Einsum is slower
            return hidden @ (weight.transpose(-1, -2) @ vm)
        return hidden @ torch.einsum("hjr,bhjd->bhrd", weight, vm)
    sigma = torch.einsum("bhir,hjr->bhij", hidden, weight) * key_mask.to(hidden.dtype)
    return sigma @ v
