"""A simple feature pyramid for plain (single-scale) ViT backbones in mmdet (ViTDet, Li et al. 2022).

The installed mmdet 3.3 ships no such neck (ViTDet lives in its source tree's ``projects/``), so this small
one is registered in mmdet's ``MODELS``: from the last stride-16 map of a ViT it builds strides 4, 8, 16
and 32 with transposed convolutions / max pooling, each followed by a 1x1 and a 3x3 convolution with
channel LayerNorm, plus max-pooled extra levels up to ``num_outs`` (an RPN wants five).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmdet.registry import MODELS


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _rescale(channels: int, scale: float) -> Tuple[nn.Module, int]:
    if scale == 4.0:
        half = channels // 2
        return nn.Sequential(nn.ConvTranspose2d(channels, half, 2, 2), ChannelLayerNorm(half), nn.GELU(),
                             nn.ConvTranspose2d(half, channels // 4, 2, 2)), channels // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(channels, channels // 2, 2, 2), channels // 2
    if scale == 1.0:
        return nn.Identity(), channels
    if scale == 0.5:
        return nn.MaxPool2d(2, 2), channels
    raise ValueError(f"scale factor {scale} is not supported; use some of 4.0, 2.0, 1.0, 0.5")


@MODELS.register_module()
class SimpleFeaturePyramid(BaseModule):
    """Multi-scale maps from one ViT feature map (the last of the backbone's outputs).

    Args:
        in_channels: channels of the backbone's map (the ViT's embed_dims).
        out_channels: channels of every pyramid level.
        scale_factors: rescaling of the input map per level (4.0, 2.0, 1.0, 0.5 gives strides 4..32).
        num_outs: levels returned; levels beyond the scale factors are max-pooled from the last one.
    """

    def __init__(self, in_channels: int, out_channels: int, scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 num_outs: int = 5, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        if num_outs < len(scale_factors):
            raise ValueError(f"num_outs={num_outs} is smaller than the {len(scale_factors)} scale factors")
        self.num_outs = num_outs
        self.levels = nn.ModuleList()
        for scale in scale_factors:
            rescale, channels = _rescale(in_channels, float(scale))
            self.levels.append(nn.Sequential(
                rescale,
                nn.Conv2d(channels, out_channels, 1, bias=False), ChannelLayerNorm(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), ChannelLayerNorm(out_channels)))

    def forward(self, inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        x = inputs[-1]
        outs: List[torch.Tensor] = [level(x) for level in self.levels]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
