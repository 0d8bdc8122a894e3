# mmseg's 80k ADE20K schedule with the 1500-iteration linear warm-up of its ViT and Swin configs, as one variable.
# The 80k configs inherit their 160k config and this file; mmengine refuses a key that two bases both define,
# so this file defines `schedule_80k` only and the 80k configs take its keys (param_scheduler = ...).
schedule_80k = dict(
    param_scheduler=[
        dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
        dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=80000, by_epoch=False)
    ],
    train_cfg=dict(type='IterBasedTrainLoop', max_iters=80000, val_interval=8000),
    default_hooks=dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=8000)))
