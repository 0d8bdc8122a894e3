# Softmax baseline: mmseg's VisionTransformer (ViT-Small/16) + UperNet, ADE20K 512x512, 160k iterations.
_base_ = ['./upernet_vit-t16_8xb2-160k_ade20k-512x512.py']
embed_dims = 384
model = dict(
    backbone=dict(embed_dims=embed_dims, num_heads=6),
    neck=dict(in_channels=[embed_dims] * 4, out_channels=embed_dims),
    decode_head=dict(in_channels=[embed_dims] * 4),
    auxiliary_head=dict(in_channels=embed_dims))
