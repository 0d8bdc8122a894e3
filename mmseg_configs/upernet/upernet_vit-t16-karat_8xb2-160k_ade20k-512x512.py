# KArAt ViT-Tiny/16 + UperNet, ADE20K 512x512, 160k iterations: the softmax baseline with KArAt attention
# (Fourier basis, G = 3, phi1_w2 with rank 12, blockwise; 32 x 32 patches + class token = 1025 tokens).
_base_ = ['./upernet_vit-t16_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmseg_configs.backbones'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        type='KArAtVisionTransformer',
        basis_type='FourierBasis', grid=3, hidden_dim=12, modular_attn=True, modular_mode='phi1_w2',
        blockwise=True, base_fn='ZeroModule'))
