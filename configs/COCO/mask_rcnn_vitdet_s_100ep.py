"""Softmax baseline, ViT-Small (384 wide, 12 blocks, 6 heads), otherwise the common base."""
from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.embed_dim = 384
model.backbone.net.num_heads = 6
