"""Softmax baseline, Cascade Mask R-CNN with ViT-Base (the common base with cascade box heads)."""
from ..common.cascade_heads import use_cascade_heads
from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

use_cascade_heads(model.roi_heads)
