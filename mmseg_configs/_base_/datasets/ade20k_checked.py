# mmseg's ADE20K settings; the dataset class checks the folder layout first (clear error for a wrong data_root).
_base_ = ['mmseg::_base_/datasets/ade20k.py']
custom_imports = dict(imports=['mmseg_configs'], allow_failed_imports=False)
train_dataloader = dict(dataset=dict(type='CheckedADE20KDataset'))
val_dataloader = dict(dataset=dict(type='CheckedADE20KDataset'))
test_dataloader = dict(dataset=dict(type='CheckedADE20KDataset'))
