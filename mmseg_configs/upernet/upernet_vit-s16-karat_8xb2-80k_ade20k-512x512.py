# The 160k config on mmseg's 80k schedule.
_base_ = ['./upernet_vit-s16-karat_8xb2-160k_ade20k-512x512.py']
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=80000, by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=80000, val_interval=8000)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=8000))
