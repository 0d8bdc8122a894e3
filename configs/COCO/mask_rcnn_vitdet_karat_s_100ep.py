"""KArAt ViTDet, ViT-Small: Fourier KArAt with G = 3, rank 12, phi1_w2, blockwise."""
from ..common.karat import use_karat
from .mask_rcnn_vitdet_s_100ep import dataloader, lr_multiplier, model, optimizer, train

use_karat(model.backbone.net)
