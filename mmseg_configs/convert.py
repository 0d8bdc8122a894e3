"""Weights for the mmseg / mmdet KArAt ViT: timm names to mmseg names, and fitting a state dict to a model.

Used by ``KArAtVisionTransformer.init_weights`` (``init_cfg=dict(type='Pretrained', checkpoint=...)``) and by
``mmseg_configs.export`` (``tools/convert_to_mmseg.py``); this module is load-time code and builds no model.
Fitting a checkpoint to a model means: timm names mapped to mmseg's (the mapping of mmseg's own ``vit2mmseg``), the position embedding resized to the model's patch grid, a 1-channel
patch embedding adapted to 3 channels (timm's ``adapt_input_conv``), KArAt operator tensors resampled to the
model's token count (spec section 6, ``karat.resample``), and a check that everything but KArAt tensors is
there, so a checkpoint of another architecture fails loudly although the load itself is non-strict.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from karat import TokenLayout, drop_unused_base_weights, resample_karat_state_dict
from karat.attention import is_karat_key
from karat.transfer import adapt_patch_embed

# timm tensors that a segmentation backbone never takes (classifier head and its norms).
TIMM_HEAD = ("head.", "head_dist.", "fc_norm.", "pre_logits.")
_BLOCK_MAP = (
    (r"norm1\.", "ln1."), (r"norm2\.", "ln2."),
    (r"attn\.qkv\.weight", "attn.attn.in_proj_weight"), (r"attn\.qkv\.bias", "attn.attn.in_proj_bias"),
    (r"attn\.proj\.", "attn.attn.out_proj."), (r"attn\.karat\.", "attn.karat."),
    (r"mlp\.fc1\.", "ffn.layers.0.0."), (r"mlp\.fc2\.", "ffn.layers.1."),
)


@dataclass
class LoadReport:
    """What fitting a checkpoint to a backbone did, printed for the user (and read by tests)."""

    loaded: List[str] = field(default_factory=list)
    resampled: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)  # in the model, not in the checkpoint (initialised by the model)
    dropped: List[str] = field(default_factory=list)  # in the checkpoint, not taken (classifier head, ...)
    notes: List[str] = field(default_factory=list)

    @property
    def missing_non_karat(self) -> List[str]:
        return [k for k in self.new if not is_karat_key(k)]

    def __str__(self) -> str:
        def sample(names: Sequence[str]) -> str:
            return "" if not names else f" (e.g. {', '.join(names[:3])})"

        lines = [f"loaded:    {len(self.loaded)} tensors",
                 f"resampled: {len(self.resampled)} tensors{sample(self.resampled)}",
                 f"new:       {len(self.new)} tensors{sample(self.new)}"
                 + (" -- KArAt operator tensors only, freshly initialised" if self.new and not self.missing_non_karat
                    else ""),
                 f"dropped:   {len(self.dropped)} tensors{sample(self.dropped)}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


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
    """timm ``VisionTransformer`` names to mmseg ``VisionTransformer`` names (KArAt tensors included).
    Returns the mapped dict and the timm tensors a backbone does not take (classifier head)."""
    out: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    unsupported: List[str] = []
    for k, v in state.items():
        if k.startswith(TIMM_HEAD):
            dropped.append(k)
        elif k in ("cls_token", "pos_embed"):
            out[k] = v
        elif k.startswith("patch_embed.proj."):
            out[k.replace("patch_embed.proj.", "patch_embed.projection.")] = v
        elif k.startswith("norm_pre."):
            out[k.replace("norm_pre.", "ln_pre.")] = v
        elif k.startswith("norm."):
            out[k.replace("norm.", "ln1.", 1)] = v
        elif (m := re.match(r"blocks\.(\d+)\.(.*)$", k)):
            rest = m.group(2)
            for pattern, repl in _BLOCK_MAP:
                if re.match(pattern, rest):
                    out[f"layers.{m.group(1)}.{re.sub('^' + pattern, repl, rest)}"] = v
                    break
            else:
                unsupported.append(k)
        else:
            unsupported.append(k)
    if unsupported:
        raise ValueError(f"{len(unsupported)} tensors of this timm ViT have no counterpart in mmseg's ViT "
                         f"(e.g. {unsupported[:3]}): layer scale, q/k norms and register tokens are not supported. "
                         f"Use a plain ViT (vit_tiny/small/base_patch16_224 or a KArAt one).")
    return out, dropped


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
    check_architecture(state, expected)
    grid = _grid(model)
    _fit_pos_embed(state, model, grid, report)
    _fit_patch_embed(state, expected, report)
    _fit_karat(state, model, grid, report)
    return state, check_state(state, model, report=report,
                              allow_new=() if getattr(model, "with_cls_token", True) else ("cls_token",))


def _arch(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Width, patch size, depth and MLP width of an mmseg-named ViT state dict (what is there to read)."""
    arch: Dict[str, Any] = {}
    proj = state.get("patch_embed.projection.weight")
    if proj is not None:
        arch["width (embed_dims)"] = int(proj.shape[0])
        arch["patch size"] = tuple(int(v) for v in proj.shape[2:])
    elif "pos_embed" in state:
        arch["width (embed_dims)"] = int(state["pos_embed"].shape[-1])
    layers = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    if layers:
        arch["depth (num_layers)"] = max(layers) + 1
    fc1 = state.get("layers.0.ffn.layers.0.0.weight")
    if fc1 is not None:
        arch["MLP width"] = int(fc1.shape[0])
    return arch


def check_architecture(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming width, patch size, depth or MLP width when the checkpoint's differ from the
    model's, before anything is resampled (a width mismatch would otherwise surface as a token-count error)."""
    have, want = _arch(state), _arch(expected)
    diff = [f"{k} {have[k]} vs the model's {want[k]}" for k in want if k in have and have[k] != want[k]]
    if diff:
        raise ValueError(f"The checkpoint's tensors do not fit this ViT, it is for another architecture: "
                         f"{'; '.join(diff)}. Build the backbone with the "
                         f"checkpoint's architecture (embed_dims, patch_size, num_layers, mlp_ratio), or convert a "
                         f"classifier of this architecture (tools/convert_to_mmseg.py writes meta.backbone, the "
                         f"options its output fits).")


def _grid(model: nn.Module) -> Tuple[int, int]:
    ps = model.patch_size if isinstance(model.patch_size, int) else model.patch_size[0]
    return model.img_size[0] // ps, model.img_size[1] // ps


def _fit_pos_embed(state: Dict[str, torch.Tensor], model: nn.Module, grid: Tuple[int, int], report: LoadReport) -> None:
    pos = state.get("pos_embed")
    if pos is None:
        return
    n = pos.shape[1]
    side = round(n ** 0.5)
    if side * side == n:  # timm ViT without class token: no class slot in its position embedding
        pos = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
        report.notes.append("pos_embed had no class-token slot; a zero one was added")
    src_side = round((pos.shape[1] - 1) ** 0.5)
    if src_side * src_side != pos.shape[1] - 1:
        raise ValueError(f"pos_embed of the checkpoint has {n} positions: not a square patch grid (with or without "
                         f"a class token), so it cannot be fitted to the {grid[0]}x{grid[1]} grid of this model.")
    if (src_side, src_side) != grid:
        pos = model.resize_pos_embed(pos, grid, (src_side, src_side), model.interpolate_mode)
        report.resampled.append("pos_embed")
        report.notes.append(f"pos_embed resized from {src_side}x{src_side} to {grid[0]}x{grid[1]} patches")
    state["pos_embed"] = pos


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
    """The token layout a KArAt operator of ``num_tokens`` keys was trained on: a square patch grid, with
    a class token in front when the count is a square plus one."""
    for prefix in (0, 1):
        side = round(max(num_tokens - prefix, 0) ** 0.5)
        if side > 0 and side * side == num_tokens - prefix:
            return TokenLayout(prefix, (side, side))
    raise ValueError(f"KArAt operator tensors of the checkpoint are for {num_tokens} tokens: neither a square grid of "
                     f"patches nor one plus a class token, so they cannot be resampled to this model's tokens. "
                     f"Convert the original classification checkpoint with tools/convert_to_mmseg.py instead.")


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


def check_state(state: Mapping[str, torch.Tensor], model: nn.Module, report: Optional[LoadReport] = None,
                ignore_missing: Iterable[str] = (), allow_new: Iterable[str] = ()) -> LoadReport:
    """Compare ``state`` with ``model.state_dict()``: unknown tensors or shape mismatches mean another
    architecture (error); missing tensors must be KArAt ones (or ``allow_new`` prefixes), else error."""
    report = report or LoadReport()
    expected = model.state_dict()
    ignore, allow = tuple(ignore_missing), tuple(allow_new)
    name = type(model).__name__
    _, unused_base = drop_unused_base_weights(state, model)  # older checkpoints; load_state_dict drops them too
    report.dropped.extend(unused_base)
    unknown = [k for k in state if k not in expected and not any(i in k for i in ignore) and k not in unused_base]
    head = [k for k in unknown if k.startswith(TIMM_HEAD + ("norm.",))]  # a classifier's head and final norm
    report.dropped.extend(head)
    unknown = [k for k in unknown if k not in head]
    if unknown:
        raise ValueError(f"The checkpoint has {len(unknown)} tensors that {name} does not have (e.g. {unknown[:3]}): "
                         f"it is for another architecture. Use a checkpoint of the same backbone, or convert a timm "
                         f"ViT with tools/convert_to_mmseg.py.")
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{len(wrong)} tensors of the checkpoint do not fit {name} ({wrong[:3]}): width, depth, heads, "
                         f"window size or KArAt options (grid, hidden_dim, ...) differ from the model's config.")
    resampled = set(report.resampled)
    report.loaded = [k for k in state if k in expected and k not in resampled and k not in head]
    report.new = [k for k in expected if k not in state and not any(i in k for i in ignore)]
    bad = [k for k in report.new if not is_karat_key(k) and not k.startswith(allow)]
    if bad:
        raise ValueError(f"The checkpoint lacks {len(bad)} non-KArAt tensors of {name} (e.g. {bad[:3]}): it is for "
                         f"another architecture (or not a backbone checkpoint). Only KArAt operator tensors may be "
                         f"missing (a softmax checkpoint starts a KArAt model).")
    return report
