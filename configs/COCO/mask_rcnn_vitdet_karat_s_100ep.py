"""KArAt ViTDet, ViT-Small: Fourier KArAt with G = 3, rank 12, phi1_w2, blockwise."""
from detectron2_plugin.backbone import KArAtViT

from .mask_rcnn_vitdet_s_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net._target_ = KArAtViT
model.backbone.net.karat = dict(basis_type="FourierBasis", grid=3, hidden_dim=12, modular_attn=True,
                                modular_mode="phi1_w2", blockwise=True)
