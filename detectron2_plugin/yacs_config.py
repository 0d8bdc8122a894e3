"""The yacs route: ``add_karat_config(cfg)`` and a ``BACKBONE_REGISTRY`` builder, as detectron2 projects do.

    cfg = get_cfg(); add_karat_config(cfg)
    cfg.merge_from_file("Base-RCNN-FPN.yaml")
    cfg.MODEL.BACKBONE.NAME = "build_karat_vitdet_backbone"
    cfg.MODEL.KARAT.GRID = 1; cfg.MODEL.KARAT.UNIVERSAL = True
    model = build_model(cfg)

``MODEL.VIT`` holds the ViTDet options (defaults: ViT-Base, 1024 px, windows of 14, global blocks 2, 5, 8, 11),
``MODEL.KARAT`` the KArAt options (generated from ``KArAtConfig``: upper-case keyword names, ``KARAT_DEPTH``
for the KAN depth; ``ENABLED=False`` gives detectron2's own softmax ``ViT`` with the same settings).

detectron2's ``MODEL.DEVICE`` defaults to ``cuda``; on a machine without CUDA both ``add_karat_config`` and the
builder switch it to ``cpu`` with a log line (as ``classification.main`` falls back to the CPU), so the snippet
runs anywhere. An explicit non-CUDA device is left alone.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Dict

import torch
import torch.nn as nn
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, SimpleFeaturePyramid, ViT
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from karat.config import kwargs_from_yacs, yacs_node

from .backbone import KArAtViT

_logger = logging.getLogger(__name__)

__all__ = ["add_karat_config", "build_karat_vitdet_backbone", "cpu_fallback", "karat_options_from_cfg",
           "vit_options_from_cfg"]


def cpu_fallback(cfg: CN) -> None:
    """Set ``MODEL.DEVICE`` to ``cpu`` when it asks for CUDA and no CUDA device is available (logged)."""
    device = str(cfg.MODEL.get("DEVICE", "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available() and not cfg.is_frozen():
        _logger.warning("MODEL.DEVICE=%s but CUDA is not available: using MODEL.DEVICE=cpu instead.", device)
        cfg.MODEL.DEVICE = "cpu"


def add_karat_config(cfg: CN) -> CN:
    """Add the ``MODEL.VIT`` (ViTDet) and ``MODEL.KARAT`` nodes with their defaults to a detectron2 config
    (and fall back to ``MODEL.DEVICE=cpu`` where CUDA is unavailable)."""
    cpu_fallback(cfg)
    cfg.MODEL.VIT = CN()
    v = cfg.MODEL.VIT
    v.IMG_SIZE = 1024
    v.PATCH_SIZE = 16
    v.EMBED_DIM = 768
    v.DEPTH = 12
    v.NUM_HEADS = 12
    v.MLP_RATIO = 4.0
    v.QKV_BIAS = True
    v.DROP_PATH_RATE = 0.1
    v.USE_ABS_POS = True
    v.USE_REL_POS = True
    v.WINDOW_SIZE = 14
    v.WINDOW_BLOCK_INDEXES = [0, 1, 3, 4, 6, 7, 9, 10]
    v.RESIDUAL_BLOCK_INDEXES = []
    v.USE_ACT_CHECKPOINT = False
    v.PRETRAIN_IMG_SIZE = 224
    v.PRETRAIN_USE_CLS_TOKEN = True
    v.OUT_CHANNELS = 256
    v.SCALE_FACTORS = [4.0, 2.0, 1.0, 0.5]
    v.SQUARE_PAD = 1024
    cfg.MODEL.KARAT = yacs_node(CN)  # one upper-case key per KArAtConfig option (KARAT_DEPTH: the KAN depth)
    cfg.MODEL.KARAT.ENABLED = True
    return cfg


def karat_options_from_cfg(cfg: CN) -> Dict[str, Any]:
    """``MODEL.KARAT`` as keyword options for :class:`KArAtViT` (``karat=...``)."""
    return kwargs_from_yacs(cfg.MODEL.KARAT)


def vit_options_from_cfg(cfg: CN) -> Dict[str, Any]:
    """``MODEL.VIT`` as keyword arguments of detectron2's ``ViT`` (and ``KArAtViT``)."""
    v = cfg.MODEL.VIT
    return dict(img_size=v.IMG_SIZE, patch_size=v.PATCH_SIZE, in_chans=len(cfg.MODEL.PIXEL_MEAN),
                embed_dim=v.EMBED_DIM, depth=v.DEPTH, num_heads=v.NUM_HEADS, mlp_ratio=v.MLP_RATIO,
                qkv_bias=v.QKV_BIAS, drop_path_rate=v.DROP_PATH_RATE, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                use_abs_pos=v.USE_ABS_POS, use_rel_pos=v.USE_REL_POS, window_size=v.WINDOW_SIZE,
                window_block_indexes=list(v.WINDOW_BLOCK_INDEXES),
                residual_block_indexes=list(v.RESIDUAL_BLOCK_INDEXES), use_act_checkpoint=v.USE_ACT_CHECKPOINT,
                pretrain_img_size=v.PRETRAIN_IMG_SIZE, pretrain_use_cls_token=v.PRETRAIN_USE_CLS_TOKEN)


@BACKBONE_REGISTRY.register()
def build_karat_vitdet_backbone(cfg: CN, input_shape: ShapeSpec) -> Backbone:
    """ViTDet (plain ViT + SimpleFeaturePyramid, outputs p2-p6 at 1024 px / patch 16) with KArAt attention."""
    if not hasattr(cfg.MODEL, "KARAT") or not hasattr(cfg.MODEL, "VIT"):
        raise KeyError("build_karat_vitdet_backbone needs the MODEL.VIT and MODEL.KARAT config nodes: call "
                       "detectron2_plugin.add_karat_config(cfg) before merging your config file.")
    cpu_fallback(cfg)  # build_model moves the model to MODEL.DEVICE after this builder returns
    vit_kwargs = vit_options_from_cfg(cfg)
    if vit_kwargs["in_chans"] != input_shape.channels:
        raise ValueError(f"MODEL.PIXEL_MEAN has {vit_kwargs['in_chans']} channels but the input has "
                         f"{input_shape.channels}.")
    if cfg.MODEL.KARAT.ENABLED:
        net: Backbone = KArAtViT(**vit_kwargs, karat=karat_options_from_cfg(cfg))
    else:
        if vit_kwargs["use_act_checkpoint"]:
            raise ValueError("MODEL.VIT.USE_ACT_CHECKPOINT with MODEL.KARAT.ENABLED=False uses detectron2's ViT, "
                             "which needs fairscale for activation checkpointing; install it or turn it off.")
        net = ViT(**vit_kwargs)
    return SimpleFeaturePyramid(net, in_feature="last_feat", out_channels=cfg.MODEL.VIT.OUT_CHANNELS,
                                scale_factors=tuple(cfg.MODEL.VIT.SCALE_FACTORS), top_block=LastLevelMaxPool(),
                                norm="LN", square_pad=cfg.MODEL.VIT.SQUARE_PAD)
