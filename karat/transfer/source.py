"""Reading a ViT classifier (ours or timm's) as the starting point of another host's backbone (spec section 6).

Every converter starts here: the classifier in timm's parameter names together with what it is (width, depth,
heads, patch, token layout, KArAt options), so that no host has to guess them from tensor shapes.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from ..attention import is_karat_key
from ..checkpoint import load_checkpoint
from ..config import KArAtConfig
from ..params import drop_unused_base_weights
from ..resample import TokenLayout

TIMM_PREFIX = "timm:"
# Keys every timm VisionTransformer checkpoint has; a checkpoint without them is another architecture.
VIT_KEYS = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
HEAD_PREFIXES = ("head.", "head_dist.")


@dataclass
class ViTSource:
    """A ViT classifier in timm's parameter names (classifier head removed) and what it is."""

    state_dict: Dict[str, torch.Tensor]
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    in_chans: int
    layout: TokenLayout  # prefix tokens (class, registers) and patch grid its attention saw
    karat_kwargs: Optional[Dict[str, Any]]  # KArAtConfig fields of a KArAt source; None for softmax
    origin: str
    dropped: List[str] = field(default_factory=list)  # tensors a backbone never takes (the classifier head)

    @property
    def is_karat(self) -> bool:
        return self.karat_kwargs is not None

    def karat_config(self, **overrides: Any) -> Optional[KArAtConfig]:
        """The source's KArAt options (``overrides`` replace some, e.g. ``impl``); None for a softmax source."""
        if self.karat_kwargs is None:
            return None
        return KArAtConfig(**{**self.karat_kwargs, **overrides})

    def __str__(self) -> str:
        kind = "KArAt" if self.is_karat else "softmax"
        return (f"{kind} ViT from {self.origin}: embed_dim {self.embed_dim}, depth {self.depth}, "
                f"{self.num_heads} heads, patch {self.patch_size}, {self.in_chans} input channel(s), "
                f"{self.layout.prefix} prefix token(s) + {self.layout.grid[0]}x{self.layout.grid[1]} patches")


def load_vit_source(source: str, num_heads: Optional[int] = None) -> ViTSource:
    """Read a ViT classifier from ``source``:

    * a checkpoint written by ``classification.main`` or the demo (``model``, ``model_name``, ``model_kwargs``);
    * a plain timm ViT state dict (``.pth``/``.pt``/``.bin``/``.safetensors``), softmax or KArAt;
    * ``timm:<model name>``: timm's pretrained weights of that model (needs the Hugging Face hub or its cache).

    ``num_heads`` is needed only for a plain state dict whose head count is not 64-dimensional heads.
    """
    import timm  # the KArAt models are registered: importing karat (this module's package) registered them

    model_name: Optional[str] = None
    model_kwargs: Dict[str, Any] = {}
    if source.startswith(TIMM_PREFIX):
        model_name = source[len(TIMM_PREFIX):]
        if model_name.split(".")[0] not in timm.list_models():
            raise ValueError(f"{source}: timm has no model {model_name!r}.")
        state = timm.create_model(model_name, pretrained=True).state_dict()
    else:
        state, model_name, model_kwargs = _read_file(Path(source))
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}
    missing = [k for k in VIT_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"{source} is not a ViT classifier checkpoint: it has no {missing[0]} (its tensors look like "
            f"{sorted(state)[:3]}). The converters take ViTs trained by classification.main (or the demo) and "
            f"softmax timm ViTs (vit_tiny/small/base_patch16_224, or timm:<name>).")
    has_karat = any(is_karat_key(k) for k in state)
    dropped = [k for k in state if k.startswith(HEAD_PREFIXES)]
    body = {k: v for k, v in state.items() if k not in dropped}

    proj = state["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    if model_name is not None:
        model = _meta_model(model_name, model_kwargs)
        num_heads = model.blocks[0].attn.num_heads
        layout = TokenLayout(model.num_prefix_tokens, tuple(model.patch_embed.grid_size))
        karat_cfg = getattr(model, "karat_cfg", None)
        body, unused = drop_unused_base_weights(body, model)  # a checkpoint from before the zero base lost w_b
        dropped += unused
        karat_kwargs = dataclasses.asdict(karat_cfg) if karat_cfg is not None else None
    else:
        if has_karat:
            raise ValueError(
                f"{source} holds KArAt weights but not the options they were trained with (basis, grid, rank, "
                f"...). Convert the checkpoint written by classification.main (it records model_name and "
                f"model_kwargs) instead of a bare state dict.")
        num_heads = num_heads or max(embed_dim // 64, 1)
        layout = _layout_from_tensors(state, source)
        karat_kwargs = None
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} of {source} is not divisible by num_heads={num_heads}.")
    if has_karat != (karat_kwargs is not None):
        raise ValueError(f"{source}: the recorded model {model_name!r} does not match its tensors "
                         f"({'with' if has_karat else 'without'} KArAt weights).")
    return ViTSource(body, embed_dim, depth, num_heads, patch_size, in_chans, layout, karat_kwargs,
                     origin=source, dropped=dropped)


def _read_file(path: Path) -> tuple[Dict[str, torch.Tensor], Optional[str], Dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist. Give a file written by classification.main "
                                f"(<output_dir>/checkpoint.pth), a timm ViT state dict, or timm:<model name>.")
    ckpt = load_checkpoint(path)  # .safetensors too; a damaged file is "corrupt or truncated"
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} does not hold a state dict (it holds a {type(ckpt).__name__}).")
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    name = ckpt.get("model_name")
    return dict(state), name, dict(ckpt.get("model_kwargs") or {})


def _meta_model(model_name: str, model_kwargs: Mapping[str, Any]) -> nn.Module:
    """The recorded architecture, built without allocating weights, to read its heads, tokens and options."""
    import timm

    kwargs = dict(model_kwargs)
    kwargs.pop("pretrained", None)
    with torch.device("meta"):
        return timm.create_model(model_name, **kwargs)


def _layout_from_tensors(state: Mapping[str, torch.Tensor], source: str) -> TokenLayout:
    prefix = int("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    if "pos_embed" not in state:
        raise ValueError(f"{source}: a ViT without pos_embed; its token layout cannot be inferred.")
    n = state["pos_embed"].shape[1]
    for p in (prefix, 0):  # position embeddings with or without the prefix tokens (no_embed_class)
        side = int(round((n - p) ** 0.5))
        if n > p and side * side == n - p:
            return TokenLayout(prefix, (side, side))
    raise ValueError(f"{source}: pos_embed has {n} tokens, not a square patch grid after {prefix} prefix tokens.")


def adapt_patch_embed(weight: torch.Tensor, in_chans: int) -> tuple[torch.Tensor, str]:
    """A patch embedding for ``in_chans`` input channels, and how it was made: a grayscale one is repeated over the
    channels and divided by their number (an image with equal channels then embeds exactly as the grayscale image
    did); other channel counts go through timm's ``adapt_input_conv``."""
    from timm.models import adapt_input_conv

    if weight.shape[1] == in_chans:
        return weight, "unchanged"
    if weight.shape[1] == 1:
        note = f"grayscale weights repeated over {in_chans} channels / {in_chans}"
        return weight.repeat(1, in_chans, 1, 1) / in_chans, note
    if weight.shape[1] == 3:
        return adapt_input_conv(in_chans, weight).to(weight.dtype), "timm's adapt_input_conv"
    raise ValueError(f"Cannot adapt a patch embedding for {weight.shape[1]} input channels to {in_chans}: give the "
                     f"target model {weight.shape[1]} input channels so it takes the weights as they are.")
