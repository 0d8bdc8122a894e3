"""The common base: ViTDet Mask R-CNN, ViT-Base, COCO, 100 epochs (ViTDet's recipe), detectron2's softmax ViT.

Every other COCO config overrides this file: the size variants change the ViT's width/depth/heads, the KArAt
variants switch ``model.backbone.net`` to ``KArAtViT`` and add ``karat`` options. Start from a converted
classification checkpoint: ``train.init_checkpoint=<tools/convert_to_detectron2.py output>``.
"""
from functools import partial

from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler

from ..common.coco_lsj import dataloader

# detectron2's ViTDet Mask R-CNN: ViT-B/16 at 1024 px, windows of 14 x 14 (global blocks 2, 5, 8, 11),
# decomposed relative-position bias, drop path 0.1, SimpleFeaturePyramid (p2-p6), LN heads.
model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = ""  # a ViTDet backbone checkpoint from tools/convert_to_detectron2.py

# 100 epochs = 184375 iterations of 64 images over COCO train2017 (118k images).
train.max_iter = 184375
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],
        num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

# AdamW with layer-wise learning-rate decay (0.7 per block from the top), no weight decay on pos_embed.
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
