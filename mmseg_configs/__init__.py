"""KArAt for OpenMMLab: the registration entry that mmseg / mmdet configs load through ``custom_imports``.

``custom_imports = dict(imports=['mmseg_configs'], allow_failed_imports=False)`` registers everything a KArAt
config names; importing any submodule (``mmseg_configs.backbones`` in older configs) runs this first.
Export code (``export.py``, the converter) is not loaded here: it builds models, so it sits above them.
"""
from . import compat  # noqa: F401  (mmengine resume checkpoints under torch >= 2.6)
from . import flops  # noqa: F401  (KArAt's handles in mmengine's counters, see flops.py)
from .backbones import DET_MODELS, KArAtSwinTransformer, KArAtVisionTransformer
from .datasets import CheckedADE20KDataset

if DET_MODELS is not None:  # mmdet installed: the simple feature pyramid joins the backbones in its registry
    from . import necks  # noqa: F401

__all__ = ["CheckedADE20KDataset", "KArAtSwinTransformer", "KArAtVisionTransformer"]
