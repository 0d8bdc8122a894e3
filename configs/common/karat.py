"""The paper's KArAt options for a ViTDet backbone (Fourier basis, G = 3, rank 12, phi1_w2, blockwise: the
classifiers' setting) and the switch of a ViTDet config's ``model.backbone.net`` to ``KArAtViT`` with them."""
from detectron2_plugin.backbone import KArAtViT

KARAT_OPTIONS = dict(basis_type="FourierBasis", grid=3, hidden_dim=12, modular_attn=True, modular_mode="phi1_w2",
                     blockwise=True)


def use_karat(net, **overrides):
    """Make ``net`` (a LazyCall of detectron2's ``ViT``) a ``KArAtViT`` with ``KARAT_OPTIONS`` updated by
    ``overrides`` (e.g. ``grid=1``), in place; returns it."""
    net._target_ = KArAtViT
    net.karat = dict(KARAT_OPTIONS, **overrides)
    return net
