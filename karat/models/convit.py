"""KArAt ConViT registered in timm (``convit_tiny_karat`` and Small/Base).

ConViT's first ``local_up_to_layer`` blocks use gated positional self-attention (GPSA) over the patch tokens:
``attn = (1 - g) softmax(S) + g softmax(P)`` with a learned positional score ``P`` and a per-head gate ``g``.
KArAt replaces the content softmax: ``out = (1 - g) sigma(S) V + g softmax(P) V``. timm renormalises the
mixture's rows; with a learnable, unnormalised ``sigma`` that division could approach zero, so the KArAt GPSA
does not renormalise (spec section 1: nothing normalises the rows afterwards). The later blocks (plain
multi-head attention, with the class token) use KArAt in place of their softmax.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.convit import GPSA, MHSA, ConVit, _create_convit
from timm.models.convit import _cfg as _convit_cfg

from ..attention import KArAtCore, OperatorFactory
from ..config import KArAtConfig, pop_config
from ..operator import OperatorProvider
from ._swap import swap_modules


class _WithKArAtCore(nn.Module):
    """Mixin for a host attention class: builds it, then adds the KArAt core for its heads."""

    def __init__(self, *args: Any, karat_cfg: KArAtConfig, num_tokens: int,
                 operator_factory: OperatorFactory | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.karat = KArAtCore(self.num_heads, num_tokens, karat_cfg, operator_factory, self.attn_drop.p)


class KArAtGPSA(_WithKArAtCore, GPSA):
    """timm's GPSA (same parameter names) with ``sigma(S)`` as the content attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if self.rel_indices is None or self.rel_indices.shape[1] != n:
            self.rel_indices = self.get_rel_indices(n)
        q, k = self.qk(x).reshape(b, n, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).reshape(b, n, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)
        pos_score = self.pos_proj(self.rel_indices.expand(b, -1, -1, -1)).permute(0, 3, 1, 2).softmax(dim=-1)
        gate = torch.sigmoid(self.gating_param.view(1, -1, 1, 1))
        content = self.karat(q, k, v, scale=self.scale)
        x = (1.0 - gate) * content + gate * (self.attn_drop(pos_score) @ v)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class KArAtMHSA(_WithKArAtCore, MHSA):
    """ConViT's plain multi-head attention (same parameter names) with KArAt in place of the softmax."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = self.karat(q, k, v, scale=self.scale).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


def karatize_convit(model: nn.Module, cfg: KArAtConfig) -> nn.Module:
    """Swap GPSA (patch tokens) and MHSA (patch tokens + class token) modules for their KArAt versions, in a
    ``ConVit`` or a features wrapper of one (``features_only=True`` gives timm's ``FeatureGetterNet``)."""
    provider = OperatorProvider(cfg)
    convit = next((m for m in model.modules() if isinstance(m, ConVit)), None)
    if convit is None:
        raise TypeError(f"karatize_convit takes a timm ConVit (or a features wrapper of one), "
                        f"not {type(model).__name__}")
    patches = convit.patch_embed.num_patches

    def common(old: nn.Module) -> dict:
        return dict(dim=old.proj.in_features, num_heads=old.num_heads, attn_drop=old.attn_drop.p,
                    proj_drop=old.proj_drop.p, karat_cfg=cfg, operator_factory=provider)

    swap_modules(model, GPSA, lambda old: KArAtGPSA(
        **common(old), qkv_bias=old.qk.bias is not None, locality_strength=old.locality_strength, num_tokens=patches))
    swap_modules(model, MHSA, lambda old: KArAtMHSA(
        **common(old), qkv_bias=old.qkv.bias is not None, num_tokens=patches + 1))
    model.karat_cfg = cfg
    return model


def _create_convit_karat(variant: str, pretrained: bool = False, **kwargs: Any) -> ConVit:
    cfg = pop_config(kwargs)
    if kwargs.get("dynamic_img_size") or kwargs.get("dynamic_img_pad"):
        raise ValueError("ConViT is built for one input size, in timm as here (its patch embedding checks the size "
                         "and GPSA's positional scores are tied to the patch grid): build it with img_size=... for "
                         "the size you use. The KArAt ViT takes dynamic_img_size=True.")
    return karatize_convit(_create_convit(variant, pretrained=pretrained, **kwargs), cfg)


default_cfgs = generate_default_cfgs({
    "convit_tiny_karat.fb_in1k": _convit_cfg(hf_hub_id="timm/convit_tiny.fb_in1k"),
    "convit_small_karat.fb_in1k": _convit_cfg(hf_hub_id="timm/convit_small.fb_in1k"),
    "convit_base_karat.fb_in1k": _convit_cfg(hf_hub_id="timm/convit_base.fb_in1k"),
})


@register_model
def convit_tiny_karat(pretrained: bool = False, **kwargs: Any) -> ConVit:
    """ConViT-Ti with KArAt content attention (pretrained=True starts from timm's softmax ConViT-Ti)."""
    model_args = dict(local_up_to_layer=10, locality_strength=1.0, embed_dim=48, num_heads=4)
    return _create_convit_karat("convit_tiny_karat", pretrained, **dict(model_args, **kwargs))


@register_model
def convit_small_karat(pretrained: bool = False, **kwargs: Any) -> ConVit:
    """ConViT-S with KArAt content attention."""
    model_args = dict(local_up_to_layer=10, locality_strength=1.0, embed_dim=48, num_heads=9)
    return _create_convit_karat("convit_small_karat", pretrained, **dict(model_args, **kwargs))


@register_model
def convit_base_karat(pretrained: bool = False, **kwargs: Any) -> ConVit:
    """ConViT-B with KArAt content attention."""
    model_args = dict(local_up_to_layer=10, locality_strength=1.0, embed_dim=48, num_heads=16)
    return _create_convit_karat("convit_base_karat", pretrained, **dict(model_args, **kwargs))
