# The 160k config on mmseg's 80k schedule.
_base_ = ['./upernet_swin-t-karat_8xb2-160k_ade20k-512x512.py', '../_base_/schedules/warmup_poly_80k.py']
param_scheduler = _base_.schedule_80k.param_scheduler
train_cfg = _base_.schedule_80k.train_cfg
default_hooks = _base_.schedule_80k.default_hooks
