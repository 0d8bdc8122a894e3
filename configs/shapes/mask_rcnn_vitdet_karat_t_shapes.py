"""The miniature recipe on the embedded shapes set with KArAt: the demo classifier's options (Fourier, G = 3,
rank 12, phi1_w2, blockwise). Windows of 16 tokens take the classifier's operators as they are; global blocks
(256 tokens) get them resampled by tools/convert_to_detectron2.py."""
from detectron2_plugin.backbone import KArAtViT

from .mask_rcnn_vitdet_t_shapes import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net._target_ = KArAtViT
model.backbone.net.karat = dict(basis_type="FourierBasis", grid=3, hidden_dim=12, modular_attn=True,
                                modular_mode="phi1_w2", blockwise=True)
# impl="auto": windows of 16 keys materialise sigma(S) (cheapest that small), global blocks of 256 keys take the
# memory-efficient path
train.output_dir = "./output/mask_rcnn_vitdet_karat_t_shapes"
