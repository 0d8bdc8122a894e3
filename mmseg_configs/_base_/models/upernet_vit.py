# UperNet + ViT as mmseg's own base (MultiLevelNeck, UPerHead, FCN auxiliary head), with slide inference:
# windows of the training crop, which is what a KArAt ViT needs (its weights are tied to the token count);
# the softmax baselines use the same so that both are evaluated alike.
_base_ = ['mmseg::_base_/models/upernet_vit-b16_ln_mln.py']
# patch_bias=True: timm ViTs (and the project's classifiers) have a patch-embedding bias.
model = dict(
    pretrained=None,
    backbone=dict(patch_bias=True),
    data_preprocessor=dict(size=(512, 512)),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
