"""KArAt ViTDet, ViT-Base: Fourier KArAt with G = 1 (the paper's Base setting), rank 12, phi1_w2, every head of
every block its own operator. Windowed blocks: 196 tokens; global blocks: 64 x 64 = 4096 tokens at 1024 px."""
from ..common.karat import use_karat
from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

use_karat(model.backbone.net, grid=1)
