"""KArAt Swin Transformers registered in timm (``swin_tiny_patch4_window7_224_karat`` and Small/Base).

timm's Swin builds its ``WindowAttention`` directly, so a KArAt Swin is timm's own ``SwinTransformer`` whose
window attentions are swapped for ``KArAtWindowAttention`` after construction (and after any pretrained
softmax weights were loaded, which the swap keeps). The relative-position bias is added to the logits before
the KArAt operator, and shifted-window masks are passed as key masks with KArAt semantics: a masked key adds
nothing inside ``Phi`` and gets zero weight (Swin's ``-100`` would mask nothing without a softmax).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, WindowAttention, _create_swin_transformer
from timm.models.swin_transformer import _cfg as _swin_cfg

from ..attention import KArAtCore, OperatorFactory
from ..config import KArAtConfig, pop_config
from ..operator import OperatorProvider
from ..resample import TokenLayout
from ._swap import swap_modules


class KArAtWindowAttention(WindowAttention):
    """timm's window attention (same parameter names) with KArAt in place of the softmax."""

    def __init__(self, *args: Any, karat_cfg: KArAtConfig, operator_factory: Optional[OperatorFactory] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.karat = KArAtCore(self.num_heads, self.window_area, karat_cfg, operator_factory, self.attn_drop.p,
                               layout=TokenLayout(0, tuple(self.window_size)))

    def set_window_size(self, window_size) -> None:
        """timm's in-place window change (``SwinTransformer.set_input_size``): timm resizes the bias table, and the
        KArAt operator, indexed by position in the window, is resampled to the new window with ``karat.resample``."""
        old = tuple(self.window_size)
        super().set_window_size(window_size)
        self.karat.resample_(TokenLayout(0, old), TokenLayout(0, tuple(self.window_size)))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: ``(B * num_windows, N, C)``; mask: ``(num_windows, N, N)``, 0 where attention is allowed."""
        b_, n, _ = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        keep = None
        if mask is not None:
            num_win = mask.shape[0]
            keep = (mask == 0).view(1, num_win, 1, n, n).expand(b_ // num_win, -1, -1, -1, -1).reshape(b_, 1, n, n)
        x = self.karat(q, k, v, bias=self._get_rel_pos_bias(), key_mask=keep, scale=self.scale)
        x = x.transpose(1, 2).reshape(b_, n, -1)
        return self.proj_drop(self.proj(x))


def karatize_swin(model: nn.Module, cfg: KArAtConfig) -> nn.Module:
    """Swap every ``WindowAttention`` of a timm Swin (or a features wrapper of one) for the KArAt version,
    keeping its weights (``qkv``, ``proj``, relative-position bias table)."""
    provider = OperatorProvider(cfg)

    def build(old: WindowAttention) -> KArAtWindowAttention:
        return KArAtWindowAttention(old.dim, old.num_heads, head_dim=old.qkv.out_features // 3 // old.num_heads,
                                    window_size=old.window_size, qkv_bias=old.qkv.bias is not None,
                                    attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p, karat_cfg=cfg,
                                    operator_factory=provider)

    swap_modules(model, WindowAttention, build)
    model.karat_cfg = cfg
    return model


def _create_swin_karat(variant: str, pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    cfg = pop_config(kwargs)
    return karatize_swin(_create_swin_transformer(variant, pretrained=pretrained, **kwargs), cfg)


default_cfgs = generate_default_cfgs({
    "swin_tiny_patch4_window7_224_karat.ms_in1k": _swin_cfg(hf_hub_id="timm/swin_tiny_patch4_window7_224.ms_in1k"),
    "swin_small_patch4_window7_224_karat.ms_in1k": _swin_cfg(hf_hub_id="timm/swin_small_patch4_window7_224.ms_in1k"),
    "swin_base_patch4_window7_224_karat.ms_in1k": _swin_cfg(hf_hub_id="timm/swin_base_patch4_window7_224.ms_in1k"),
})


@register_model
def swin_tiny_patch4_window7_224_karat(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin-T with KArAt in every window attention (pretrained=True starts from timm's softmax Swin-T)."""
    model_args: Dict[str, Any] = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2),
                                      num_heads=(3, 6, 12, 24))
    return _create_swin_karat("swin_tiny_patch4_window7_224_karat", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_small_patch4_window7_224_karat(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin-S with KArAt in every window attention."""
    model_args: Dict[str, Any] = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2),
                                      num_heads=(3, 6, 12, 24))
    return _create_swin_karat("swin_small_patch4_window7_224_karat", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_base_patch4_window7_224_karat(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin-B with KArAt in every window attention."""
    model_args: Dict[str, Any] = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2),
                                      num_heads=(4, 8, 16, 32))
    return _create_swin_karat("swin_base_patch4_window7_224_karat", pretrained, **dict(model_args, **kwargs))
