# KArAt Swin-T + UperNet, ADE20K 512x512, 160k iterations: mmseg's Swin-T config with KArAt window attention
# (7 x 7 windows = 49 tokens; relative-position bias added to the logits, shifted-window regions and the
# padding to whole windows are KArAt key masks). The softmax Swin-T checkpoint initialises everything but
# the KArAt operators.
_base_ = ['./upernet_swin-t_8xb2-160k_ade20k-512x512.py']
model = dict(
    backbone=dict(
        type='KArAtSwinTransformer',
        basis_type='FourierBasis', grid=3, hidden_dim=12, modular_attn=True, modular_mode='phi1_w2',
        blockwise=True, base_fn='ZeroModule'))
