"""KArAt ViTDet, ViT-Base, universal sharing: one operator per head index shared by all windowed blocks (196
tokens) and one shared by all global blocks (4096 tokens); otherwise as the blockwise Base config."""
from .mask_rcnn_vitdet_karat_b_blockwise_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.karat.blockwise = False
model.backbone.net.karat.universal = True
