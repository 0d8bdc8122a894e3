"""KArAt ViTDet, Cascade Mask R-CNN, ViT-Base with blockwise G = 1 KArAt."""
from ..common.cascade_heads import use_cascade_heads
from .mask_rcnn_vitdet_karat_b_blockwise_100ep import dataloader, lr_multiplier, model, optimizer, train

use_cascade_heads(model.roi_heads)
