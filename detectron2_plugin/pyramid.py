"""Pieces a small-image ViTDet pyramid needs that detectron2 hard-codes for 1024 px / patch 16."""
from __future__ import annotations

from detectron2.modeling.backbone.fpn import LastLevelMaxPool


class LastLevelMaxPoolFrom(LastLevelMaxPool):
    """detectron2's ``LastLevelMaxPool`` (one extra level by stride-2 max pooling) taking any input level:
    with patch 2 the pyramid is p1-p2, so the extra p3 comes from p2 instead of detectron2's fixed p5."""

    def __init__(self, in_feature: str = "p5") -> None:
        super().__init__()
        self.in_feature = in_feature
