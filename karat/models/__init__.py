"""timm-registered KArAt models; importing this module registers them."""
from .convit import KArAtGPSA, KArAtMHSA, convit_base_karat, convit_small_karat, convit_tiny_karat, karatize_convit
from .swin_transformer import (
    KArAtWindowAttention,
    karatize_swin,
    swin_base_patch4_window7_224_karat,
    swin_small_patch4_window7_224_karat,
    swin_tiny_patch4_window7_224_karat,
)
from .vision_transformer import (
    is_karat_key,
    vit_base_patch16_224_karat,
    vit_num_tokens,
    vit_small_patch16_224_karat,
    vit_tiny_patch16_224_karat,
)

__all__ = ["KArAtGPSA", "KArAtMHSA", "karatize_convit", "convit_tiny_karat", "convit_small_karat", "convit_base_karat",
           "KArAtWindowAttention", "karatize_swin", "swin_tiny_patch4_window7_224_karat",
           "swin_small_patch4_window7_224_karat", "swin_base_patch4_window7_224_karat", "is_karat_key",
           "vit_num_tokens", "vit_tiny_patch16_224_karat", "vit_small_patch16_224_karat", "vit_base_patch16_224_karat"]
