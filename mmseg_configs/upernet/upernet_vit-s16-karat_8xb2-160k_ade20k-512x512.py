# KArAt ViT-Small/16 + UperNet, ADE20K 512x512, 160k iterations: the softmax baseline with KArAt attention
# (Fourier basis, G = 3, phi1_w2 with rank 12, blockwise; 32 x 32 patches + class token = 1025 tokens).
_base_ = ['./upernet_vit-s16_8xb2-160k_ade20k-512x512.py', '../_base_/models/karat.py']
model = dict(backbone=dict(_base_.karat_options, type='KArAtVisionTransformer'))
