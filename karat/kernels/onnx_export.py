"""What changes while ``torch.onnx.export`` traces a KArAt model: the evaluation path, not the math (issue 21).

The default path on a CPU is the C++ kernel's custom op ``karat::fourier_reduce``, which neither exporter can
translate, and the reference path materialises ``sigma(S)`` with its ``N x N x 2G`` features. While an ONNX export
runs (either exporter: ``torch.onnx.is_in_onnx_export()`` is True for both), :func:`karat.kernels.choose` therefore
takes the efficient path, whose key reduction for a shared-feature basis is :func:`reduce_keys` here:

* the key loop has a fixed number of blocks, sized from the (static) key count only, so it unrolls into a graph
  whose tensors are ``N x block`` feature planes (``basis.feature_planes``), each multiplied by its ``block x r``
  coefficients (``basis.plane_coefficients``): no ``N x N x 2G`` tensor, not even an ``N x N`` one, whatever the
  batch size (a dynamic axis). For Fourier the planes are ``cos``, ``sin`` and their products with powers of ``cos``
  (one ``Sin`` and one ``Cos`` an entry: ONNX Runtime evaluates them one entry at a time, at the cost of about twelve
  multiplications each);
* the work stays in the caller's ``(B, H, N, .)`` layout (no head-major copies: ONNX Runtime's ``Transpose`` is
  slow), a key-level mask zeroes the block's coefficients instead of its planes, and ViTDet's decomposed
  relative-position bias is added block by block from its two small terms (blocks of whole key rows), never as an
  ``N x N`` tensor;
* no custom op, no in-place ``out=`` buffers and no activation checkpointing, which the exporters cannot record;
* small matrices (Swin's windows) take that path too instead of the reference one: an exported graph never holds
  ``N x N x 2G`` features.

Nothing is needed from the user beyond calling the exporter.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..relpos import Bias, DecomposedRelPos

# Feature entries of one key block (M planes of N x block), as a fraction of N x N per head and image: the planes
# of one block hold no more than the N x N logits of a softmax export. But at least MIN_BLOCK_KEYS keys a block in
# reduce_keys (N x 64 x M entries: more than N x N below N = 64 M, yet no plane is N x N): ONNX Runtime's cost per
# node and the sums of the blocks' partial products (N x r each) are per block, and at 197 keys (ViT-Tiny) four
# blocks ran about 4% faster than seven (benchmarks/README.md, "ONNX Runtime").
BLOCK_FRACTION = 1.0
MIN_BLOCK_KEYS = 64


def exporting() -> bool:
    """Whether ``torch.onnx.export`` (TorchScript or dynamo exporter) is tracing the model now."""
    return bool(torch.onnx.is_in_onnx_export())


def block_size(num_keys: int, width: int) -> int:
    """Keys per block in an exported graph: ``N x block x width`` feature entries stay within
    ``BLOCK_FRACTION x N x N``. Depends on the key count and the basis width only (static in the graph). A symbolic
    key count (dynamic spatial axes) is one block: see :func:`symbolic_keys`."""
    if symbolic_keys(num_keys):
        return num_keys
    return max(1, min(num_keys, int(BLOCK_FRACTION * num_keys) // max(1, width)))


def symbolic_keys(num_keys) -> bool:
    """Whether the key count is a symbol of the graph (the dynamo exporter with dynamic spatial axes): the key loop then
    cannot unroll into a count of blocks fixed at export time, so the keys are one block (``N x N`` feature planes,
    as large as a softmax's logits each)."""
    return isinstance(num_keys, torch.SymInt)


def _blocks(n: int, block: int, row: int = 1) -> List[slice]:
    """Key blocks of about ``block`` keys, each a whole number of ``row``-key rows (a decomposed bias's key grid)."""
    if symbolic_keys(n):  # a key count known when the exported graph runs: one block
        return [slice(0, n)]
    block = max(row, block // row * row)
    return [slice(j, min(j + block, n)) for j in range(0, n, block)]


def _bias_block(bias: Bias, j: slice) -> torch.Tensor:
    """The bias of key block ``j``; a decomposed one from its terms (``j`` covers whole key rows)."""
    if isinstance(bias, DecomposedRelPos):
        kw = bias.rel_w.shape[-1]
        rows = slice(j.start // kw, j.stop // kw)
        return (bias.rel_h[..., rows, None] + bias.rel_w[..., None, :]).flatten(-2)
    return bias[..., j]


def reduce_keys(layer, q: torch.Tensor, k: torch.Tensor, bias: Optional[Bias], key_mask: Optional[torch.Tensor],
                coef: torch.Tensor, scale: float) -> torch.Tensor:
    """``Phi(scale q k^T + bias)``, ``(B, H, N, r)``, as an exported graph records it (a shared-feature ``layer``).

    q, k ``(B, H, N, d)``; bias a tensor broadcastable to ``(B, H, N, N)`` or a ``DecomposedRelPos``; key_mask bool,
    ``(.., 1, N)`` (key level) or ``(.., N, N)``; coef ``(H, N, M(+1), r)`` (``efficient._layer_coefficients``)."""
    basis = layer.basis
    m = basis.num_functions
    planes_coef, constant = basis.plane_coefficients(coef[..., :m, :])  # (H, N, P, r), (H, N, r) or None
    if layer.has_base:
        planes_coef = torch.cat([planes_coef, coef[..., m:, :]], dim=-2)
    keep = None if key_mask is None else key_mask.to(q.dtype)
    key_level = keep is None or keep.shape[-2] == 1
    out = None
    if constant is not None and key_level:  # sum over the (kept) keys of their constant terms
        out = constant.sum(-2, keepdim=True) if keep is None else keep @ constant
    q = q * scale
    n = layer.in_features  # the key count as a Python int: every block's slice of the coefficients is a constant
    row = bias.rel_w.shape[-1] if isinstance(bias, DecomposedRelPos) else 1
    block = min(n, max(MIN_BLOCK_KEYS, block_size(n, planes_coef.shape[-2])))
    for j in _blocks(n, block, row):
        s = q @ k[..., j, :].transpose(-2, -1)  # (B, H, N, block)
        if bias is not None:
            s = s + _bias_block(bias, j)
        keep_j = None if keep is None else keep[..., j]
        plane_keep = None if key_level else keep_j
        planes = basis.feature_planes(s, plane_keep)
        if layer.has_base:
            base = layer.base_fn(s)
            planes.append(base if plane_keep is None else base * plane_keep)
        cj = planes_coef[:, j]  # (H, block, P, r)
        if key_level and keep_j is not None:  # masked keys: zero coefficients, (B, H, block, P, r)
            cj = cj * keep_j.transpose(-1, -2).unsqueeze(-1)
        if constant is not None and not key_level:
            part = keep_j @ constant[:, j]
            out = part if out is None else out + part
        for p, plane in enumerate(planes):  # as fast as one product of the concatenated planes, and no copy
            part = plane @ cj[..., p, :]
            out = part if out is None else out + part  # an exported graph records no in-place accumulation
    return out
