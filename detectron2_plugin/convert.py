"""A ViT classifier checkpoint (ours, KArAt or softmax, or a softmax timm ViT) as a ViTDet backbone checkpoint.

The output holds ``backbone.net.*`` tensors, the names detectron2's ViTDet models use, so it loads with
``train.init_checkpoint=<file>`` (DetectionCheckpointer, no matching heuristics needed). What happens to each
tensor:

* ``patch_embed``, ``blocks.*`` (``qkv``, ``proj``, norms, MLP): loaded as they are; a patch embedding for another
  number of input channels is adapted with timm's ``adapt_input_conv`` (e.g. grayscale -> RGB);
* ``pos_embed``: kept at the config's ``pretrain_img_size`` grid (resampled bicubically if the source grid differs;
  detectron2 interpolates it to the input at run time), the class-token position kept or dropped as the config's
  ``pretrain_use_cls_token`` says;
* KArAt operators: resampled along the key axis (spec section 6) to each block's token count: the window
  (``window_size ** 2``, 196 for ViTDet) or the whole feature map for global blocks ((img_size / patch) ** 2);
  the class-token key is dropped (ViTDet has no class token);
* new: ``rel_pos_h/w`` (zero, as detectron2 initialises them), and KArAt operators when the source is softmax;
* dropped: class token, registers, final norm, classifier head.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from karat import TokenLayout, resample_karat_state_dict, save_checkpoint
from karat.transfer import TransferReport, ViTSource, adapt_patch_embed, check_state, fit_pos_embed, load_vit_source
from karat.transfer import rename_state

from .backbone import KArAtViT

PREFIX = "backbone.net."
# ViTDet tensors no classifier has: relative positions (zero, as detectron2 initialises them), residual blocks.
NEW_OK = (r"\.attn\.rel_pos_[hw]$", r"\.residual\.")
D2_FIX = "Use a config of the same size as the checkpoint (or a checkpoint of the config's ViT)."


@dataclass
class Conversion:
    """A converted checkpoint (``backbone.net.*`` names) and what the conversion did."""

    state_dict: Dict[str, torch.Tensor]
    report: TransferReport
    notes: List[str]
    source: ViTSource

    def describe(self) -> str:
        lines = [f"source: {self.source}", str(self.report)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _net_shape(net: nn.Module) -> Dict[str, Any]:
    proj = net.patch_embed.proj
    return dict(embed_dim=proj.out_channels, depth=len(net.blocks), num_heads=net.blocks[0].attn.num_heads,
                patch_size=proj.kernel_size[0], in_chans=proj.in_channels)


def _comparable(cfg: Any) -> Dict[str, Any]:
    """KArAt options that change the weights or their meaning (num_attention only counts with mixed heads)."""
    out = dataclasses.asdict(cfg)
    if not cfg.mixed_head:
        out["num_attention"] = None
    return out


def check_architecture(src: ViTSource, net: nn.Module) -> None:
    """The source must be the same ViT (width, depth, heads, patch) and the same attention kind as the config."""
    want = _net_shape(net)
    have = dict(embed_dim=src.embed_dim, depth=src.depth, num_heads=src.num_heads, patch_size=src.patch_size)
    diff = {k: (have[k], want[k]) for k in have if have[k] != want[k]}
    if diff:
        detail = ", ".join(f"{k} {a} (checkpoint) vs {b} (config)" for k, (a, b) in diff.items())
        raise ValueError(f"The checkpoint is another ViT than the config's backbone: {detail}. Use a config of the "
                         f"same size (or set model.backbone.net.{next(iter(diff))}=... to match).")
    is_karat = isinstance(net, KArAtViT)
    if src.is_karat and not is_karat:
        raise ValueError("The checkpoint has KArAt attention but the config's backbone is detectron2's softmax ViT; "
                         "use a KArAt config (configs/*/mask_rcnn_vitdet_karat_*.py).")
    if src.is_karat:
        theirs, ours = (_comparable(c) for c in (src.karat_config(), net.karat_cfg))
        diff = {k: (theirs[k], ours[k]) for k in ours if k != "impl" and theirs[k] != ours[k]}
        if diff:
            detail = ", ".join(f"{k}={a!r} (checkpoint) vs {b!r} (config)" for k, (a, b) in diff.items())
            raise ValueError(f"The checkpoint's KArAt options differ from the config's: {detail}. Set "
                             f"model.backbone.net.karat.<option> to the checkpoint's values.")


def map_timm_names(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """timm ViT names -> detectron2 ViT names (``karat.transfer.RENAMES['detectron2']``); (mapped, dropped)."""
    return rename_state(state, "detectron2")


def convert_pos_embed(pos: torch.Tensor, src: ViTSource, net: nn.Module) -> Tuple[torch.Tensor, Optional[str]]:
    """The source's absolute position embedding in the layout of ``net.pos_embed`` (pretrain grid, class token)."""
    use_cls = net.pretrain_use_cls_token
    side = int(round((net.pos_embed.shape[1] - int(use_cls)) ** 0.5))
    out, notes = fit_pos_embed(pos, (side, side), use_cls, src_grid=src.layout.grid,
                               missing_cls="set model.backbone.net.pretrain_use_cls_token=False.")
    note = None
    if notes:
        note = (f"{notes[0]} (the config's pretrain_img_size); set pretrain_img_size="
                f"{src.layout.grid[0] * src.patch_size} to keep it as trained.")
    return out, note


def convert(source: ViTSource, net: nn.Module) -> Conversion:
    """Convert ``source`` for the ViTDet backbone ``net`` (an instantiated ``ViT`` or ``KArAtViT``)."""
    check_architecture(source, net)
    state, dropped = map_timm_names(source.state_dict)
    dropped = list(source.dropped) + dropped
    notes: List[str] = []
    resampled: List[str] = []
    in_chans = net.patch_embed.proj.in_channels
    if source.in_chans != in_chans:
        state["patch_embed.proj.weight"], how = adapt_patch_embed(state["patch_embed.proj.weight"], in_chans)
        resampled.append("patch_embed.proj.weight")
        notes.append(f"patch_embed adapted from {source.in_chans} to {in_chans} input channel(s) ({how}).")
    if net.pos_embed is None:
        if state.pop("pos_embed", None) is not None:
            dropped.append("pos_embed")
    elif "pos_embed" in state:
        state["pos_embed"], note = convert_pos_embed(state["pos_embed"], source, net)
        if note:
            notes.append(note)
            resampled.append("pos_embed")
    if isinstance(net, KArAtViT) and source.is_karat:
        src_layout = TokenLayout(source.layout.prefix, tuple(source.layout.grid))

        def layout_of(name: str, _op: nn.Module) -> TokenLayout:
            block = int(name.split(".")[1])
            return TokenLayout(0, tuple(net.blocks[block].attn.input_size))

        state, rs = resample_karat_state_dict(state, net, layout_of, src=src_layout)
        resampled += rs.resampled
        if rs.resampled:
            notes.append(str(rs))
    report = check_state(net, state, host="detectron2", resampled=resampled, dropped=dropped, allow_new=NEW_OK,
                         fix=D2_FIX)
    prefixed = {PREFIX + k: v.contiguous() for k, v in state.items()}
    report = TransferReport([PREFIX + k for k in report.loaded], [PREFIX + k for k in report.resampled],
                            [PREFIX + k for k in report.new], report.dropped)
    return Conversion(prefixed, report, notes, source)


def build_backbone_net(config_file: str, overrides: Sequence[str] = ()) -> nn.Module:
    """The config's ``model.backbone.net`` (the ViT alone), instantiated on the CPU."""
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), list(overrides))
    try:
        net_cfg = cfg.model.backbone.net
    except Exception as e:
        raise ValueError(f"{config_file} has no model.backbone.net: converters target ViTDet configs.") from e
    return instantiate(net_cfg)


def convert_file(source: str, config_file: str, output: Path, overrides: Sequence[str] = (),
                 overwrite: bool = False) -> Conversion:
    """Read ``source`` (file or ``timm:<name>``), convert it for ``config_file``'s backbone, write ``output``."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it.")
    net = build_backbone_net(config_file, overrides)
    src = load_vit_source(source, num_heads=net.blocks[0].attn.num_heads)
    conversion = convert(src, net)
    save_checkpoint(dict(model=conversion.state_dict, __author__="karat detectron2_plugin.convert",
                         source=str(source), config=str(config_file),
                         transfer=dict(loaded=conversion.report.loaded, resampled=conversion.report.resampled,
                                       new=conversion.report.new, dropped=conversion.report.dropped)), output)
    return conversion
