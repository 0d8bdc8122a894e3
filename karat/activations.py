"""Base activations ``b(x)`` of a KAN edge (the ``base_fn`` option), beside the learnable basis part.

A leaf module: ``karat.config`` resolves ``base_fn`` names to these classes and ``karat.bases`` builds on the
config, so neither may hold them without an import cycle.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ZeroModule(nn.Module):
    """The default base activation: no base term (``b(x) = 0``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)
