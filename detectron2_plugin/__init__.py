"""KArAt for detectron2: the ViTDet backbone, its yacs/lazy-config registration and the embedded shapes set.

Importing this package registers ``build_karat_vitdet_backbone`` in ``BACKBONE_REGISTRY`` and the
``karat_shapes_{train,val}`` datasets (root: ``$KARAT_SHAPES_ROOT``, default ``datasets/karat_shapes``).
"""
from . import flops  # noqa: F401  (KArAt's handles in fvcore's counters, see flops.py)
from .backbone import KArAtViT, KArAtViTAttention, karat_config_from
from .data import register_shapes
from .yacs_config import add_karat_config, build_karat_vitdet_backbone

register_shapes()

__all__ = ["KArAtViT", "KArAtViTAttention", "add_karat_config", "build_karat_vitdet_backbone", "karat_config_from",
           "register_shapes"]
