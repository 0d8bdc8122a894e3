"""Softmax baseline, ViT-Tiny (192 wide, 12 blocks, 3 heads), otherwise the common base."""
from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.embed_dim = 192
model.backbone.net.num_heads = 3
