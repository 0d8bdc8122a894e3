"""Export: a ViT classifier (KArAt or softmax, ours or timm's) written as an mmseg backbone checkpoint.

``tools/convert_to_mmseg.py`` and the demo call ``convert_classifier``. It builds the target backbone, so it
sits above ``backbones`` (which loads weights through ``convert``, the load-time half): no import cycle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch.nn as nn
from mmseg.models.backbones import VisionTransformer

from karat.checkpoint import save_checkpoint
from karat.transfer import load_vit_source

from .backbones import KArAtVisionTransformer
from .convert import LoadReport, fit_vit_state


def backbone_kwargs(source: Any, img_size: Tuple[int, int], with_cls_token: bool, in_channels: int) -> Dict[str, Any]:
    """mmseg ``VisionTransformer`` options matching a ``karat.transfer.ViTSource`` (the config's backbone)."""
    fc1 = source.state_dict["blocks.0.mlp.fc1.weight"]
    kwargs: Dict[str, Any] = dict(
        img_size=tuple(img_size), patch_size=source.patch_size, in_channels=in_channels, embed_dims=source.embed_dim,
        num_layers=source.depth, num_heads=source.num_heads, mlp_ratio=fc1.shape[0] // source.embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in source.state_dict,
        patch_bias="patch_embed.proj.bias" in source.state_dict, with_cls_token=with_cls_token,
        final_norm="norm.weight" in source.state_dict, norm_cfg=dict(type="LN", eps=1e-6),
        out_indices=(source.depth - 1,))
    return kwargs


def convert_classifier(source: str, output: Any, img_size: Sequence[int] = (512, 512),
                       with_cls_token: Optional[bool] = None, in_channels: int = 3, overwrite: bool = False,
                       num_heads: Optional[int] = None) -> LoadReport:
    """Write an mmseg backbone checkpoint from a ViT classifier (ours or a softmax timm ViT).

    The output holds ``state_dict`` with ``backbone.``-prefixed mmseg names (so it works both as
    ``model.backbone.init_cfg=dict(type='Pretrained', checkpoint=...)`` and as ``load_from``), and ``meta`` with
    the backbone options the weights fit (KArAt options included) and the report."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite (overwrite=True) to replace it.")
    src = load_vit_source(source, num_heads=num_heads)
    img_size = tuple(int(v) for v in (img_size if len(img_size) == 2 else (img_size[0], img_size[0])))
    cls = src.layout.prefix > 0 if with_cls_token is None else with_cls_token
    kwargs = backbone_kwargs(src, img_size, cls, in_channels)
    karat_cfg = src.karat_config()
    target = _build_target(kwargs, karat_cfg)
    state, report = fit_vit_state(src.state_dict, target)
    report.dropped = sorted(set(report.dropped) | set(src.dropped))
    for k in ("cls_token",):  # a class token the source never had: stored as the model's init, reported new
        if k not in state:
            state[k] = target.state_dict()[k]
            report.new = [n for n in report.new if n != k] + [k]
    meta = dict(backbone=dict(kwargs, type=type(target).__name__,
                              **({"karat_cfg": __import__("dataclasses").asdict(karat_cfg)} if karat_cfg else {})),
                source=str(source), report=str(report))
    save_checkpoint(dict(state_dict={f"backbone.{k}": v for k, v in state.items()}, meta=meta), output)
    return report


def _build_target(kwargs: Dict[str, Any], karat_cfg: Any) -> nn.Module:
    if karat_cfg is None:
        return VisionTransformer(**kwargs)
    return KArAtVisionTransformer(**kwargs, karat_cfg=karat_cfg)
