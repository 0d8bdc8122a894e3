"""What changes while ``torch.onnx.export`` traces a KArAt model: the evaluation path, not the math (issue 21).

The default path on a CPU is the C++ kernel's custom op ``karat::fourier_reduce``, which neither exporter can
translate, and the reference path materialises ``sigma(S)`` with its ``N x N x 2G`` features. While an ONNX export
runs (either exporter: ``torch.onnx.is_in_onnx_export()`` is True for both), :func:`karat.kernels.choose` therefore
takes the blockwise PyTorch path of :mod:`karat.kernels.efficient` (the same code, no second copy of the formula)
with three export settings:

* the key loop has a fixed number of blocks, sized from the (static) key count only, so it unrolls into a graph
  that holds one ``N x block x 2G`` feature tensor at a time and no ``N x N`` tensor: at most ``N x N / 2`` feature
  entries per head and image, whatever the batch size (which stays a dynamic axis);
* no custom op, no in-place ``out=`` buffers and no activation checkpointing, which the exporters cannot record;
* small matrices (Swin's windows) take that path too instead of the reference one: an exported graph never holds
  ``N x N x 2G`` features.

Nothing is needed from the user beyond calling the exporter.
"""
from __future__ import annotations

import torch

# Feature entries of one key block, as a fraction of N x N (per head and image): 1/2 keeps the block's features
# and the planes they are built from below the N x N logits and probabilities that a softmax export holds.
BLOCK_FRACTION = 0.5


def exporting() -> bool:
    """Whether ``torch.onnx.export`` (TorchScript or dynamo exporter) is tracing the model now."""
    return bool(torch.onnx.is_in_onnx_export())


def block_size(num_keys: int, width: int) -> int:
    """Keys per block in an exported graph: ``N x block x width`` feature entries stay within
    ``BLOCK_FRACTION x N x N``. Depends on the key count and the basis width only (static in the graph)."""
    return max(1, min(num_keys, int(BLOCK_FRACTION * num_keys) // max(1, width)))
