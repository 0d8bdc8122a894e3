"""The miniature recipe on the embedded shapes set with KArAt: the demo classifier's options (Fourier, G = 3,
rank 12, phi1_w2, blockwise). Windows of 16 tokens take the classifier's operators as they are; global blocks
(256 tokens) get them resampled by tools/convert_to_detectron2.py."""
from ..common.karat import use_karat
from .mask_rcnn_vitdet_t_shapes import dataloader, lr_multiplier, model, optimizer, train

use_karat(model.backbone.net)
# impl="auto": windows of 16 keys materialise sigma(S) (cheapest that small), global blocks of 256 keys take the
# memory-efficient path
train.output_dir = "./output/mask_rcnn_vitdet_karat_t_shapes"
