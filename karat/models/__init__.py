"""timm-registered KArAt models; importing this module registers them."""
from .vision_transformer import (
    is_karat_key,
    vit_base_patch16_224_karat,
    vit_num_tokens,
    vit_small_patch16_224_karat,
    vit_tiny_patch16_224_karat,
)

__all__ = ["is_karat_key", "vit_num_tokens", "vit_tiny_patch16_224_karat", "vit_small_patch16_224_karat",
           "vit_base_patch16_224_karat"]
