"""The COCO recipe in miniature on the embedded shapes set (CPU friendly): softmax baseline.

The ViT-Tiny body of the project's digits classifier (192 wide, 12 blocks, 3 heads, patch 2, no class token,
pretrained on 4 x 4 tokens) on 32 x 32 images: 16 x 16 tokens, windows of 4 x 4 = 16 tokens (the classifier's
token count), global blocks 2, 5, 8, 11 over all 256 tokens. SimpleFeaturePyramid gives p1-p3 (strides 2, 4, 8),
the heads are narrowed to 64 channels. LSJ-style data (flip, scale 0.5-1.5, crop 32), AdamW with layer-wise
decay, cosine schedule (scale-free, so ``train.max_iter=...`` on the command line is all a short run needs).

Data: ``karat_shapes_{train,val}`` from ``$KARAT_SHAPES_ROOT`` (default ``datasets/karat_shapes``); make it with
``python -m detectron2_plugin.data --output datasets/karat_shapes``.
"""
from functools import partial

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

import detectron2_plugin  # noqa: F401  registers the karat_shapes datasets
from detectron2_plugin.pyramid import LastLevelMaxPoolFrom

from ..COCO.mask_rcnn_vitdet_t_100ep import dataloader, lr_multiplier, model, optimizer, train

_image_size, _patch_size, _channels = 32, 2, 64
_levels = ["p1", "p2", "p3"]

# Backbone: the classifier's ViT-Tiny at 32 px.
_net = model.backbone.net
_net.img_size = _image_size
_net.patch_size = _patch_size
_net.window_size = 4
_net.pretrain_img_size = 8  # the classifier's 8 x 8 digits: a 4 x 4 position embedding, no class token
_net.pretrain_use_cls_token = False
model.backbone.scale_factors = (1.0, 0.5)  # strides 2 and 4, plus p3 (stride 8) from the max-pool top block
model.backbone.top_block = L(LastLevelMaxPoolFrom)(in_feature="p2")  # p3 = max-pool of p2
model.backbone.square_pad = _image_size  # global blocks always see 16 x 16 tokens
model.backbone.out_channels = _channels
model.pixel_mean = [76.5, 76.5, 76.5]  # the classifier's normalisation (0.3, 0.38 of the [0, 1] range)
model.pixel_std = [96.9, 96.9, 96.9]

# Heads: fewer levels, small anchors, 64 channels.
_rpn = model.proposal_generator
_rpn.in_features = _levels
_rpn.head.in_channels = _channels
_rpn.anchor_generator.sizes = [[8], [16], [32]]
_rpn.anchor_generator.strides = [2, 4, 8]
_rpn.batch_size_per_image = 64
_rpn.pre_nms_topk = (400, 200)
_rpn.post_nms_topk = (100, 50)
_heads = model.roi_heads
_heads.num_classes = 3
_heads.batch_size_per_image = 64
_heads.box_in_features = _heads.mask_in_features = _levels
for _pooler in (_heads.box_pooler, _heads.mask_pooler):
    _pooler.scales = (1.0 / 2, 1.0 / 4, 1.0 / 8)
    _pooler.canonical_box_size = 16
    _pooler.canonical_level = 2
_heads.box_head.input_shape = ShapeSpec(channels=_channels, height=7, width=7)
_heads.box_head.conv_dims = [_channels]
_heads.box_head.fc_dims = [256]
_heads.box_predictor.input_shape = ShapeSpec(channels=256)
_heads.mask_head.input_shape = ShapeSpec(channels=_channels, width=14, height=14)
_heads.mask_head.conv_dims = [_channels, _channels]

# Data.
dataloader.train.dataset.names = "karat_shapes_train"
dataloader.test.dataset.names = "karat_shapes_val"
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.5, max_scale=1.5, target_height=_image_size, target_width=_image_size),
    L(T.FixedSizeCrop)(crop_size=(_image_size, _image_size), pad=False),
]
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=_image_size, max_size=_image_size),
]
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0

# Schedule and trainer on the CPU.
train.device = "cpu"
train.seed = 0  # default_setup seeds every RNG with it
train.amp.enabled = False
train.ddp.fp16_compression = False
train.max_iter = 200
train.eval_period = 200
train.log_period = 20
train.checkpointer.period = 200
train.output_dir = "./output/mask_rcnn_vitdet_t_shapes"
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.05),
    warmup_length=0.1,
    warmup_factor=0.01,
)
optimizer.lr = 2e-3  # a short schedule: heads learn from scratch in a few hundred images
optimizer.weight_decay = 0.05
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.85)
