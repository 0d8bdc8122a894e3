# The embedded, CPU-friendly config: a KArAt ViT-Tiny body (192 wide, 12 layers, 3 heads) with patch 2 on 16 x 16
# images (8 x 8 = 64 tokens, no class token) + a narrow UperNet, on the generated ADE20K-layout set
# (python -m mmseg_configs.data <root>, or mmseg_configs.data.make_embedded_ade20k). It is the ADE20K KArAt
# config with the data, the widths and the schedule shrunk, so it runs mmseg's real ADE20KDataset, runner,
# hooks and IoUMetric on a CPU. The demo starts it from the demo's classification checkpoint.
_base_ = ['./upernet_vit-t16-karat_8xb2-160k_ade20k-512x512.py']
data_root = 'data/karat_embedded/ADEChallengeData2016'
crop_size = (16, 16)
norm_cfg = dict(type='BN', requires_grad=True)
channels = 64
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(img_size=crop_size, patch_size=2, with_cls_token=False, drop_path_rate=0.0),
    neck=dict(out_channels=channels),
    decode_head=dict(in_channels=[channels] * 4, channels=channels, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=channels, channels=channels // 2, norm_cfg=norm_cfg),
    test_cfg=dict(mode='whole'))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=10, end=60, by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=60, val_interval=30)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=30, max_keep_ckpts=1))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
