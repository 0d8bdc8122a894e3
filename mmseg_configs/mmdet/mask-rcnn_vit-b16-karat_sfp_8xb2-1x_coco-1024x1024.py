# Mask R-CNN with a KArAt ViT-Base/16 backbone and a simple feature pyramid (ViTDet's plain-backbone design),
# COCO instance segmentation at 1024 x 1024, mmdet's 1x schedule. mmdet's own base configs; the backbone is
# the KArAt ViT registered in mmdet's registry by mmseg_configs (64 x 64 = 4096 tokens, no class token;
# smaller padded batches are padded to 1024 with the padded keys masked).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py', '../_base_/models/karat.py'
]
custom_imports = dict(imports=['mmseg_configs'], allow_failed_imports=False)
# Process groups start through karat-env:// (karat/distributed.py): a group that torchrun restarts
# (--max-restarts) never reads the keys its killed workers left in torchrun's store.
env_cfg = dict(dist_cfg=dict(init_method='karat-env://'))
image_size = (1024, 1024)
embed_dims = 768
model = dict(
    backbone=dict(
        _base_.karat_options,
        _delete_=True,
        type='KArAtVisionTransformer',
        img_size=image_size, patch_size=16, embed_dims=embed_dims, num_layers=12, num_heads=12,
        with_cls_token=False, out_indices=(11, ), final_norm=False, patch_bias=True, drop_path_rate=0.1,
        norm_cfg=dict(type='LN', eps=1e-6),
        grid=1,  # KArAt: the paper's Base setting (karat_options with G = 1)
        init_cfg=None),
    neck=dict(
        _delete_=True,
        type='SimpleFeaturePyramid', in_channels=embed_dims, out_channels=256,
        scale_factors=(4.0, 2.0, 1.0, 0.5), num_outs=5))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(custom_keys={'pos_embed': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}),
    clip_grad=dict(max_norm=1.0, norm_type=2))
