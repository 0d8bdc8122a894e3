"""KArAt ViTDet, ViT-Base: Fourier KArAt with G = 1 (the paper's Base setting), rank 12, phi1_w2, every head of
every block its own operator. Windowed blocks: 196 tokens; global blocks: 64 x 64 = 4096 tokens at 1024 px."""
from detectron2_plugin.backbone import KArAtViT

from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net._target_ = KArAtViT
model.backbone.net.karat = dict(basis_type="FourierBasis", grid=1, hidden_dim=12, modular_attn=True,
                                modular_mode="phi1_w2", blockwise=True)
