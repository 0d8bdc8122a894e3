# The paper's KArAt options for the segmentation / detection backbones (Fourier basis, G = 3, phi1_w2 with
# rank 12, blockwise, no base activation): keyword arguments of KArAtVisionTransformer / KArAtSwinTransformer.
# One variable, not a `model` dict: a config inherits this file beside its softmax config (which defines
# `model`; mmengine refuses a key that two bases both define) and writes
#   model = dict(backbone=dict(_base_.karat_options, type='KArAtVisionTransformer'))
karat_options = dict(
    basis_type='FourierBasis', grid=3, hidden_dim=12, modular_attn=True, modular_mode='phi1_w2',
    blockwise=True, base_fn='ZeroModule')
