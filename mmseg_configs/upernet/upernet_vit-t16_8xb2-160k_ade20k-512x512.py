# Softmax baseline: mmseg's own VisionTransformer (ViT-Tiny/16) + UperNet, ADE20K 512x512, 160k iterations.
_base_ = [
    '../_base_/models/upernet_vit.py', '../_base_/datasets/ade20k_checked.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_160k.py'
]
# Process groups start through karat-env:// (karat/distributed.py): a group that torchrun restarts
# (--max-restarts) never reads the keys its killed workers left in torchrun's store.
env_cfg = dict(dist_cfg=dict(init_method='karat-env://'))
embed_dims = 192
model = dict(
    backbone=dict(type='VisionTransformer', img_size=(512, 512), embed_dims=embed_dims, num_heads=3,
                  drop_path_rate=0.1),
    neck=dict(in_channels=[embed_dims] * 4, out_channels=embed_dims),
    decode_head=dict(in_channels=[embed_dims] * 4, num_classes=150),
    auxiliary_head=dict(in_channels=embed_dims, num_classes=150))

# AdamW as mmseg's ViT configs, no weight decay for position embedding, class token and norms
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'pos_embed': dict(decay_mult=0.),
        'cls_token': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)
    }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False)
]
# 8 GPUs x 2 images
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
