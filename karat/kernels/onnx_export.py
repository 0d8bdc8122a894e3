"""What changes while ``torch.onnx.export`` traces a KArAt model: the evaluation path, not the math (issue 21).

The default path on a CPU is the C++ kernel's custom op ``karat::fourier_reduce``, which neither exporter can
translate, and the reference path materialises ``sigma(S)`` with its ``N x N x 2G`` features. While an ONNX export
runs (either exporter: ``torch.onnx.is_in_onnx_export()`` is True for both), :func:`karat.kernels.choose` therefore
takes the blockwise PyTorch path of :mod:`karat.kernels.efficient` (the same code, no second copy of the formula)
with three export settings:

* the key loop has a fixed number of blocks, sized from the (static) key count only, so it unrolls into a graph
  whose tensors are ``N x block`` feature planes (``basis.feature_planes``), each multiplied by its ``block x r``
  coefficients: no ``N x N x 2G`` tensor, not even an ``N x N`` one, whatever the batch size (a dynamic axis);
* no custom op, no in-place ``out=`` buffers and no activation checkpointing, which the exporters cannot record;
* small matrices (Swin's windows) take that path too instead of the reference one: an exported graph never holds
  ``N x N x 2G`` features.

Nothing is needed from the user beyond calling the exporter.
"""
from __future__ import annotations

import torch

# Feature entries of one key block (M planes of N x block), as a fraction of N x N per head and image: the planes
# of one block hold no more than the N x N logits of a softmax export. Larger blocks mean fewer, larger ops; in ONNX
# Runtime on 2 CPU cores 0.5, 1 and 2 ran ViT-Tiny at about the same speed (benchmarks/README.md, "ONNX Runtime").
BLOCK_FRACTION = 1.0


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
