"""Weights for the mmseg / mmdet KArAt ViT: timm names to mmseg names, and fitting a state dict to a model.

Used by ``KArAtVisionTransformer.init_weights`` (``init_cfg=dict(type='Pretrained', checkpoint=...)``) and by
``mmseg_configs.export`` (``tools/convert_to_mmseg.py``); this module is load-time code and builds no model.
Fitting a checkpoint to a model means: timm names mapped to mmseg's, the position embedding fitted to the
model's patch grid, a 1-channel patch embedding adapted to 3 channels, KArAt operator tensors resampled to the
model's token count (spec section 6), and the check that everything but KArAt tensors is there, so a checkpoint
of another architecture fails loudly although the load itself is non-strict. The renaming table, the fitting
and the check are ``karat.transfer``'s; what stays here is what only mmseg's ViT has (its options and layout).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from karat import TokenLayout, resample_karat_state_dict
from karat.transfer import (TransferReport, adapt_patch_embed, check_architecture, check_state, fit_pos_embed,
                            rename_state, square_layout)

LoadReport = TransferReport  # the report of karat.transfer, under the name this package used
# timm tensors that a segmentation backbone never takes (classifier head and its norms, the final norm).
TIMM_HEAD = (r"^head\.", r"^head_dist\.", r"^fc_norm\.", r"^pre_logits\.", r"^norm\.")
# What a user whose checkpoint does not fit should do (ends every error of the check).
MMSEG_FIX = ("Build the backbone with the checkpoint's architecture (embed_dims, patch_size, num_layers, mlp_ratio), "
             "or convert a classifier of this architecture with tools/convert_to_mmseg.py (it writes meta.backbone, "
             "the options its output fits).")


# ------------------------------------------------------------------------------------------------------
def read_backbone_state(checkpoint: str) -> Dict[str, torch.Tensor]:
    """The backbone tensors of a checkpoint file or URL (mmengine's loader): a bare state dict, one under
    ``state_dict`` / ``model``, or a whole segmentor's (``backbone.`` keys are taken, the rest ignored)."""
    from mmengine.runner.checkpoint import CheckpointLoader

    ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location="cpu")
    return backbone_state(ckpt, origin=str(checkpoint))


def backbone_state(ckpt: Any, origin: str = "checkpoint") -> Dict[str, torch.Tensor]:
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{origin} does not hold a state dict (it holds a {type(ckpt).__name__}).")
    state = ckpt.get("state_dict", ckpt.get("model", ckpt))
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items() if torch.is_tensor(v)}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not state:
        raise ValueError(f"{origin} holds no tensors.")
    return state


def is_timm_vit(state: Mapping[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in state or any(k.startswith("blocks.") for k in state)


def timm_to_mmseg_vit(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """timm ``VisionTransformer`` names to mmseg ``VisionTransformer`` names (``karat.transfer.RENAMES['mmseg']``).
    Returns the mapped dict and the timm tensors a backbone does not take (classifier head)."""
    return rename_state(state, "mmseg")


# ------------------------------------------------------------------------------------------------------
def fit_vit_state(state: Mapping[str, torch.Tensor], model: nn.Module) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """Fit a ViT checkpoint (timm or mmseg names) to an mmseg (KArAt) ``VisionTransformer`` ``model``.

    Raises ``ValueError`` naming the problem when the checkpoint is for another architecture, or when its
    KArAt tensors cannot be resampled to the model's token count."""
    state = dict(state)
    report = LoadReport()
    if is_timm_vit(state):
        state, report.dropped = timm_to_mmseg_vit(state)
        report.notes.append("timm parameter names mapped to mmseg's")
    expected = model.state_dict()
    for name in [k for k in state if k.startswith("ln1.") and "ln1.weight" not in expected]:
        del state[name]  # a final norm the model was built without (final_norm=False)
        report.dropped.append(name)
    if "patch_embed.projection.bias" in state and "patch_embed.projection.bias" not in expected:
        del state["patch_embed.projection.bias"]
        report.dropped.append("patch_embed.projection.bias")
        report.notes.append("the model is built with patch_bias=False (mmseg's default), so the checkpoint's patch "
                            "embedding bias is not used; set patch_bias=True to keep it")
    check_architecture(expected, state, host="mmseg", fix=MMSEG_FIX)
    grid = _grid(model)
    if "pos_embed" in state:  # mmseg keeps a class-token slot whether or not the model uses the token
        state["pos_embed"], notes = fit_pos_embed(state["pos_embed"], grid, cls_slot=True,
                                                  interpolation=model.interpolate_mode, antialias=False)
        report.notes += notes
        if any(n.startswith("pos_embed resampled") for n in notes):
            report.resampled.append("pos_embed")
    _fit_patch_embed(state, expected, report)
    _fit_karat(state, model, grid, report)
    return state, check_backbone_state(state, model, report=report,
                                       allow_new=() if getattr(model, "with_cls_token", True) else ("cls_token",))


def _grid(model: nn.Module) -> Tuple[int, int]:
    ps = model.patch_size if isinstance(model.patch_size, int) else model.patch_size[0]
    return model.img_size[0] // ps, model.img_size[1] // ps


def _fit_patch_embed(state: Dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], report: LoadReport) -> None:
    key = "patch_embed.projection.weight"
    w = state.get(key)
    if w is None or key not in expected or w.shape[1] == expected[key].shape[1] or w.shape[0] != expected[key].shape[0]:
        return
    want = expected[key].shape[1]
    state[key], how = adapt_patch_embed(w, want)
    report.resampled.append(key)
    report.notes.append(f"{key}: {w.shape[1]} input channel(s) adapted to {want} ({how})")


def karat_source_layout(num_tokens: int) -> TokenLayout:
    """The token layout a KArAt operator of ``num_tokens`` keys was trained on (``karat.transfer.square_layout``)."""
    return square_layout(num_tokens, "KArAt operator tensors", "Convert the original classification checkpoint with "
                         "tools/convert_to_mmseg.py instead.")


def _fit_karat(state: Dict[str, torch.Tensor], model: nn.Module, grid: Tuple[int, int], report: LoadReport) -> None:
    from karat import KArAtOperator

    dst = TokenLayout(int(getattr(model, "with_cls_token", True)), grid)
    for name, op in model.named_modules(remove_duplicate=False):  # a universal operator under every layer
        if not isinstance(op, KArAtOperator):
            continue
        axes = op.key_axes()
        present = [f"{name}.{a}" for a in axes if f"{name}.{a}" in state]
        if not present:
            continue
        first = present[0]
        n_src = state[first].shape[axes[first[len(name) + 1:]][0]]
        if n_src == dst.num_tokens:
            continue
        src = karat_source_layout(n_src)
        if src.prefix < dst.prefix:
            raise ValueError(f"The checkpoint's KArAt operators were trained without a class token ({n_src} tokens) "
                             f"but this model has one (with_cls_token=True): a class-token key cannot be made up. "
                             f"Build the backbone with with_cls_token=False.")
        single = {k: state[k] for k in present}
        single, _ = resample_karat_state_dict(single, model, dst, src=src)
        state.update(single)
        report.resampled.extend(present)
        if not any(n.startswith("KArAt operators resampled") for n in report.notes):
            report.notes.append(f"KArAt operators resampled from {src.num_tokens} tokens ({src.prefix} prefix + "
                                f"{src.grid[0]}x{src.grid[1]}) to {dst.num_tokens} ({dst.prefix} prefix + "
                                f"{dst.grid[0]}x{dst.grid[1]}), spec section 6")


def check_backbone_state(state: Mapping[str, torch.Tensor], model: nn.Module, report: Optional[LoadReport] = None,
                         ignore_missing: Iterable[str] = (), allow_new: Iterable[str] = ()) -> LoadReport:
    """``karat.transfer.check_state`` for an mmseg backbone: a classifier's head and final norm are dropped,
    ``ignore_missing`` (substrings) and ``allow_new`` (prefixes) as mmseg's backbones need them."""
    return check_state(model, state, host="mmseg", report=report, drop=TIMM_HEAD,
                       ignore=[re.escape(i) for i in ignore_missing], allow_new=["^" + re.escape(a) for a in allow_new],
                       fix=MMSEG_FIX)
