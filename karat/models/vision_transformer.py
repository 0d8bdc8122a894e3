"""KArAt Vision Transformers registered in timm (``timm.create_model('vit_tiny_patch16_224_karat', ...)``).

They are timm's own ``VisionTransformer`` with ``KArAtAttention`` as ``attn_layer``, so everything timm
offers (``forward_features``, ``forward_head``, ``reset_classifier``, ``forward_intermediates``,
``features_only``, pretrained configs) works unchanged. KArAt options are keyword arguments named after
the paper's flags (``basis_type``, ``grid``, ``hidden_dim``, ``modular_mode``, ``universal``, ...).

``pretrained=True`` starts from the softmax timm ViT of the same size (KArAt weights freshly initialised),
the way the paper's fine-tuning starts from a softmax checkpoint.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, Mapping, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.layers import register_notrace_module, to_2tuple

from ..attention import InputLayout, KArAtAttention, is_karat_key  # noqa: F401  (re-exported by karat.models)
from ..config import pop_config
from ..operator import OperatorProvider
from ..params import drop_unused_base_weights
from ..resample import TokenLayout, resample_karat_state_dict
from ..transfer import check_architecture, check_state

_logger = logging.getLogger(__name__)

def vit_num_tokens(**kwargs: Any) -> int:
    """Tokens a timm ViT attention sees at its built size: patches plus prefix (class, register) tokens."""
    return vit_layout(**kwargs).num_tokens


# What a user whose checkpoint does not fit should do (ends every error of the check).
TIMM_FIX = ("Create the model with the checkpoint's size (e.g. vit_small_patch16_224_karat for width 384) or use a "
            "checkpoint of this one.")


def karat_vit_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionTransformer,
                        **kwargs: Any) -> Dict[str, torch.Tensor]:
    """timm's ViT checkpoint filter (position embedding resampling, ...), KArAt weights resampled to this
    model's token count (spec section 6), and ``karat.transfer.check_state``: everything except KArAt
    parameters must be present, so a wrong checkpoint fails loudly despite non-strict loading."""
    out, _ = drop_unused_base_weights(checkpoint_filter_fn(state_dict, model, **kwargs), model)
    check_architecture(model.state_dict(), out, fix=TIMM_FIX)  # before resampling, which would blame the tokens
    layout = TokenLayout(model.num_prefix_tokens, tuple(model.patch_embed.grid_size))
    out, resampled = resample_karat_state_dict(out, model, layout)
    if resampled.resampled:
        _logger.info("%s", resampled)
    head = "^" + re.escape(model.pretrained_cfg.get("classifier", "head") + ".")  # a new head is normal
    # timm adapts the head and the input channels of the patch embedding after this filter.
    report = check_state(model, out, resampled=resampled.resampled, allow_new=(head,),
                         may_differ=(head, r"^patch_embed\.proj\.weight$"), fix=TIMM_FIX)
    _logger.info("Loaded a ViT checkpoint; %d KArAt tensors are newly initialised.", len(report.new))
    return out


def vit_layout(img_size: Any = 224, patch_size: Any = 16, class_token: bool = True, reg_tokens: int = 0,
               dynamic_img_pad: bool = False, **_: Any) -> TokenLayout:
    """The token layout a timm ViT built with these arguments embeds: prefix (class, register) tokens + the grid."""
    h, w = to_2tuple(img_size)
    ph, pw = to_2tuple(patch_size)
    if (h % ph or w % pw) and not dynamic_img_pad:  # with dynamic_img_pad, timm's grid is the whole patches
        raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
    return TokenLayout(int(class_token) + reg_tokens, (h // ph, w // pw))


@register_notrace_module  # fx: reads shapes and sets state, as a leaf call on the data path
class NoteLayout(nn.Module):
    """Tells the model's attentions the token layout of the current input (``InputLayout``), from the patch grid
    (NHWC when ``dynamic_img_size``) and the tokens after the prefix tokens joined; returns the tokens."""

    def __init__(self, input_layout: InputLayout, grid_size: Tuple[int, int]) -> None:
        super().__init__()
        self.input_layout, self.grid_size = input_layout, tuple(grid_size)

    def forward(self, patches: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        grid = tuple(patches.shape[1:3]) if patches.ndim == 4 else self.grid_size
        self.input_layout.layout = TokenLayout(tokens.shape[1] - grid[0] * grid[1], grid)
        return tokens


class KArAtVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` whose attentions learn each input's token layout from the model, so that
    ``dynamic_img_size=True`` and ``set_input_size`` work as in timm: at another grid the KArAt operators are
    evaluated resampled to it (spec section 6), the way timm interpolates the position embedding."""

    def __init__(self, *args: Any, input_layout: InputLayout, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.input_layout = input_layout
        self.note_layout = NoteLayout(input_layout, self.patch_embed.grid_size)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.note_layout(x, super()._pos_embed(x))

    def set_input_size(self, img_size: Any = None, patch_size: Any = None) -> None:
        """timm's in-place change of input (and patch) size; the KArAt operators are resampled in place to the
        new grid with ``karat.resample``, as timm resamples the position embedding (and our Swin its windows)."""
        old = tuple(self.patch_embed.grid_size)
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        new = tuple(self.patch_embed.grid_size)
        self.input_layout.layout, self.note_layout.grid_size = None, new
        if new == old:
            return
        for block in self.blocks:
            core = block.attn.karat
            core.resample_(core.layout, TokenLayout(core.layout.prefix, new))


def _create_vit_karat(variant: str, pretrained: bool = False, karat_defaults: Mapping[str, Any] | None = None,
                      **kwargs: Any) -> VisionTransformer:
    cfg = pop_config(kwargs, karat_defaults)
    if "attn_layer" in kwargs:
        raise ValueError("attn_layer is set by the KArAt model; use a plain timm ViT for another attention")
    layout = vit_layout(**kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    input_layout = InputLayout()
    attn_layer = KArAtAttention.bind(cfg, layout.num_tokens, OperatorProvider(cfg), layout, input_layout)
    model = build_model_with_cfg(
        KArAtVisionTransformer, variant, pretrained,
        input_layout=input_layout,
        pretrained_filter_fn=karat_vit_filter_fn,
        pretrained_strict=False,  # KArAt tensors are new; karat_vit_filter_fn checks the rest
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        attn_layer=attn_layer,
        **kwargs,
    )
    model.karat_cfg = cfg
    return model


def _cfg(softmax_hub_id: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": "",
        "hf_hub_id": softmax_hub_id,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_INCEPTION_MEAN, "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# The tag names the softmax weights a KArAt model starts from when pretrained=True.
default_cfgs = generate_default_cfgs({
    "vit_tiny_patch16_224_karat.augreg_in21k_ft_in1k": _cfg("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
    "vit_small_patch16_224_karat.augreg_in21k_ft_in1k": _cfg("timm/vit_small_patch16_224.augreg_in21k_ft_in1k"),
    "vit_base_patch16_224_karat.augreg2_in21k_ft_in1k": _cfg("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
})


# The paper's three ViT sizes (timm's architectures) and the KArAt defaults it uses for each; the benchmark
# tool reads this table too.
VIT_SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
VIT_KARAT_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(num_attention=1), "small": dict(num_attention=3), "base": dict(num_attention=6, grid=1),
}


def _create_sized(size: str, pretrained: bool, kwargs: Dict[str, Any]) -> VisionTransformer:
    return _create_vit_karat(f"vit_{size}_patch16_224_karat", pretrained, karat_defaults=VIT_KARAT_DEFAULTS[size],
                             **dict(VIT_SIZES[size], **kwargs))


@register_model
def vit_tiny_patch16_224_karat(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny/16 with KArAt (paper default: Fourier, G = 3, r = 12, blockwise; mixed heads k = 1)."""
    return _create_sized("tiny", pretrained, kwargs)


@register_model
def vit_small_patch16_224_karat(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Small/16 with KArAt (mixed heads k = 3)."""
    return _create_sized("small", pretrained, kwargs)


@register_model
def vit_base_patch16_224_karat(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Base/16 with KArAt (the paper uses G = 1 for Base; mixed heads k = 6)."""
    return _create_sized("base", pretrained, kwargs)
