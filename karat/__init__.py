"""KArAt: Kolmogorov-Arnold Attention for vision transformers.

Importing ``karat`` registers the KArAt models in timm's registry.
"""
from .attention import KArAtAttention, KArAtCore, is_karat_key, mask_to_keep
from .bases import ZeroModule
from .checkpoint import load_checkpoint, save_checkpoint
from .config import KArAtConfig
from .kan import KANLayer
from .operator import KArAtOperator, OperatorProvider
from .optim import karat_parameter_names, param_groups
from .params import drop_unused_base_weights, paper_param_count
from .relpos import DecomposedRelPos
from .resample import TokenLayout, resample_karat_state_dict
from .simplex import project_to_simplex
from . import models  # noqa: F401  (registers timm models)
from . import distributed

distributed.register()  # the karat-env:// init method (restart-safe env://)

__version__ = "0.1.0"

__all__ = [
    "DecomposedRelPos", "KArAtAttention", "KArAtConfig", "KArAtCore", "KArAtOperator", "KANLayer",
    "OperatorProvider", "ZeroModule",
    "is_karat_key",
    "drop_unused_base_weights", "karat_parameter_names", "load_checkpoint", "mask_to_keep",
    "paper_param_count", "param_groups", "project_to_simplex",
    "save_checkpoint", "TokenLayout", "resample_karat_state_dict",
]
