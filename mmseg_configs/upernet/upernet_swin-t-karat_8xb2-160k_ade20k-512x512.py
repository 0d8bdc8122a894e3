# KArAt Swin-T + UperNet, ADE20K 512x512, 160k iterations: mmseg's Swin-T config with KArAt window attention
# (7 x 7 windows = 49 tokens; relative-position bias added to the logits, shifted-window regions and the
# padding to whole windows are KArAt key masks). The softmax Swin-T checkpoint initialises everything but
# the KArAt operators.
_base_ = ['./upernet_swin-t_8xb2-160k_ade20k-512x512.py', '../_base_/models/karat.py']
model = dict(backbone=dict(_base_.karat_options, type='KArAtSwinTransformer'))
