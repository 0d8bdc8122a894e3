# Softmax baseline: mmseg's own Swin-T UperNet config (ImageNet-1k pretrained Swin-T), ADE20K 512x512, 160k.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
]
custom_imports = dict(imports=['mmseg_configs'], allow_failed_imports=False)
# Process groups start through karat-env:// (karat/distributed.py): a group that torchrun restarts
# (--max-restarts) never reads the keys its killed workers left in torchrun's store.
env_cfg = dict(dist_cfg=dict(init_method='karat-env://'))
train_dataloader = dict(dataset=dict(type='CheckedADE20KDataset'))
val_dataloader = dict(dataset=dict(type='CheckedADE20KDataset'))
test_dataloader = dict(dataset=dict(type='CheckedADE20KDataset'))
