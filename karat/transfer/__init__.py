"""Classification checkpoints as the starting point of other hosts' backbones (spec section 6).

One module for every converter (detectron2's ViTDet, mmseg's and mmdet's ViT) and timm's pretrained filter:
``load_vit_source`` reads a classifier with what it is, ``RENAMES``/``rename_state`` map timm names to a host's
(declarative tables), ``fit_pos_embed`` fits the position embedding, ``karat.resample`` the KArAt operators, and
``check_state`` checks the result against the model into one ``TransferReport``. Only host options stay with
the host. Nothing here imports a host framework.
"""
from .check import ARCH_LABELS, TransferReport, architecture, check_architecture, check_state, check_transfer
from .fit import fit_pos_embed, square_layout
from .renames import RENAMES, rename_key, rename_state
from .source import HEAD_PREFIXES, TIMM_PREFIX, VIT_KEYS, ViTSource, adapt_patch_embed, load_vit_source

LoadReport = TransferReport  # the name mmseg_configs used for the same report

__all__ = [
    "ARCH_LABELS", "HEAD_PREFIXES", "LoadReport", "RENAMES", "TIMM_PREFIX", "TransferReport", "VIT_KEYS", "ViTSource",
    "adapt_patch_embed", "architecture", "check_architecture", "check_state", "check_transfer", "fit_pos_embed",
    "load_vit_source", "rename_key", "rename_state", "square_layout",
]
