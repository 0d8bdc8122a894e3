"""timm ViT parameter names to each host's, as data: one table a host, one function applying it either way.

A rule is ``(timm name, host name)``. A name ending in ``.`` is a prefix (the rest of the key is kept), any other
name is a whole key; ``{i}`` stands for a block index. A host name of ``None`` drops the tensor (a classifier
head the backbone has no place for). A key no rule matches has no counterpart in the host's ViT: an error, so
layer scale, q/k norms and the like are refused instead of silently lost.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, Mapping, Optional, Tuple, TypeVar

Rule = Tuple[str, Optional[str]]
V = TypeVar("V")

_BLOCK = ("norm1.", "norm2.", "attn.qkv.", "attn.proj.", "attn.karat.", "mlp.fc1.", "mlp.fc2.")

RENAMES: Dict[str, Tuple[Rule, ...]] = {
    # detectron2's ViT (ViTDet) uses timm's names for all it has; it has no class token and no final norm.
    "detectron2": (
        ("pos_embed", "pos_embed"), ("patch_embed.proj.", "patch_embed.proj."),
        *((f"blocks.{{i}}.{p}", f"blocks.{{i}}.{p}") for p in _BLOCK),
        ("cls_token", None), ("reg_token", None), ("dist_token", None), ("norm.", None), ("fc_norm.", None),
        ("head.", None), ("head_dist.", None), ("attn_pool.", None),
    ),
    # mmseg's VisionTransformer (the mapping of mmseg's own tools/model_converters/vit2mmseg.py).
    "mmseg": (
        ("cls_token", "cls_token"), ("pos_embed", "pos_embed"),
        ("patch_embed.proj.", "patch_embed.projection."), ("norm_pre.", "ln_pre."), ("norm.", "ln1."),
        ("blocks.{i}.norm1.", "layers.{i}.ln1."), ("blocks.{i}.norm2.", "layers.{i}.ln2."),
        ("blocks.{i}.attn.qkv.weight", "layers.{i}.attn.attn.in_proj_weight"),
        ("blocks.{i}.attn.qkv.bias", "layers.{i}.attn.attn.in_proj_bias"),
        ("blocks.{i}.attn.proj.", "layers.{i}.attn.attn.out_proj."),
        ("blocks.{i}.attn.karat.", "layers.{i}.attn.karat."),
        ("blocks.{i}.mlp.fc1.", "layers.{i}.ffn.layers.0.0."), ("blocks.{i}.mlp.fc2.", "layers.{i}.ffn.layers.1."),
        ("head.", None), ("head_dist.", None), ("fc_norm.", None), ("pre_logits.", None),
    ),
}


def _pattern(name: str) -> "re.Pattern[str]":
    body = re.escape(name).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(body + ("(?P<rest>.*)" if name.endswith(".") else "") + "$")


@functools.lru_cache(maxsize=None)
def _rules(host: str, inverse: bool) -> List[Tuple["re.Pattern[str]", Optional[str]]]:
    if host not in RENAMES:
        raise ValueError(f"No renaming table for host {host!r}; known hosts: {', '.join(sorted(RENAMES))}.")
    pairs = [(b, a) for a, b in RENAMES[host] if b is not None] if inverse else list(RENAMES[host])
    return [(_pattern(src), dst) for src, dst in pairs]


def rename_key(key: str, host: str, inverse: bool = False) -> Tuple[bool, Optional[str]]:
    """``(matched, new name)`` of one key: timm -> ``host`` (``inverse``: host -> timm); None means dropped."""
    for pattern, dst in _rules(host, inverse):
        m = pattern.match(key)
        if m:
            if dst is None:
                return True, None
            groups = m.groupdict()
            return True, dst.replace("{i}", groups.get("i") or "") + (groups.get("rest") or "")
    return False, None


def rename_state(state: Mapping[str, V], host: str, inverse: bool = False,
                 strict: bool = True) -> Tuple[Dict[str, V], List[str]]:
    """``state`` in ``host``'s names (``inverse``: from host to timm names) and the keys dropped on the way.

    ``strict=False`` skips keys no rule matches instead of refusing them (reading a model's shape only)."""
    out: Dict[str, V] = {}
    dropped: List[str] = []
    unknown: List[str] = []
    for k, v in state.items():
        matched, new = rename_key(k, host, inverse)
        if not matched:
            unknown.append(k)
        elif new is None:
            dropped.append(k)
        else:
            out[new] = v
    if unknown and strict:
        src, dst = (f"{host}'s", "timm's") if inverse else ("this timm", f"{host}'s")
        raise ValueError(f"{len(unknown)} tensors of {src} ViT have no counterpart in {dst} ViT (e.g. {unknown[:3]}): "
                         f"layer scale, q/k norms, post-norms and register tokens are not supported. Use a plain "
                         f"ViT (vit_tiny/small/base_patch16_224 or a KArAt one).")
    return out, dropped
