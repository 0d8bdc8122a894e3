"""KArAt backbones for OpenMMLab, registered in mmseg's and mmdet's ``MODELS`` registries.

Configs load the package, ``custom_imports = dict(imports=['mmseg_configs'], allow_failed_imports=False)``,
whose ``__init__`` imports this module (``imports=['mmseg_configs.backbones']`` loads the same). The core
``karat`` package never imports OpenMMLab; this adapter does. This module registers the models only.

* ``KArAtVisionTransformer``: mmseg's ``VisionTransformer`` (all its options, every input size) with
  ``karat.KArAtCore`` evaluating ``sigma(S) V``. Parameter names stay mmseg's (``layers.{i}.attn.attn.in_proj_weight``,
  ``...out_proj``, ``ln1``, ``ffn``), so mmseg / timm ViT weights load; KArAt tensors live under
  ``layers.{i}.attn.karat.operator.*``.
* ``KArAtSwinTransformer``: mmseg's ``SwinTransformer`` with KArAt in every window attention. The relative
  position bias is added to the logits, and the shifted-window regions and the padding to a multiple of the
  window are given to KArAt as key masks (a masked key contributes nothing, spec section 5): Swin's ``-100``
  would mask nothing without a softmax.

KArAt options are constructor keywords named like ``karat.KArAtConfig``'s fields (the KAN depth is
``karat_depth``: ``depth`` belongs to the host).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks.transformer import MultiheadAttention
from mmengine.logging import print_log
from mmengine.utils import to_2tuple
from mmseg.models.backbones.swin import ShiftWindowMSA, SwinTransformer, WindowMSA
from mmseg.models.backbones.vit import VisionTransformer
from mmseg.registry import MODELS as SEG_MODELS

from karat import KArAtConfig, KArAtCore, OperatorProvider, TokenLayout
from karat.attention import OperatorFactory
from karat.config import check_host_keywords, pop_config

from . import convert

try:  # mmdet is optional for segmentation users; when it is installed the backbones are registered there too
    from mmdet.registry import MODELS as DET_MODELS
except ImportError:  # pragma: no cover - exercised only without mmdet
    DET_MODELS = None


def _pop_karat_options(kwargs: Dict[str, Any], host: type, where: str) -> KArAtConfig:
    """KArAt options out of a backbone's keywords, validated (``KArAtConfig`` names the bad option). The
    backbone has no ``depth`` of its own to leave it to, so that name is refused with the KArAt one; a keyword
    neither mmseg's ``host`` model nor KArAt takes is named with the closest of theirs."""
    cfg = pop_config(kwargs, refuse_renamed=True, where=where)
    check_host_keywords(kwargs, [n for n in inspect.signature(host.__init__).parameters if n != "self"], where)
    return cfg


def _is_pretrained(init_cfg: Any) -> bool:
    return isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained"


# ------------------------------------------------------------------------------------------------------
# Vision Transformer
# ------------------------------------------------------------------------------------------------------
class KArAtMultiheadAttention(MultiheadAttention):
    """mmcv's ``MultiheadAttention`` (same parameters: ``attn.in_proj_weight``, ``attn.in_proj_bias``,
    ``attn.out_proj``) computing self-attention with ``KArAtCore`` instead of ``nn.MultiheadAttention``."""

    def __init__(self, embed_dims: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 dropout_layer: Optional[dict] = None, init_cfg: Optional[dict] = None, batch_first: bool = True,
                 *, karat_cfg: KArAtConfig, num_tokens: int, operator_factory: Optional[OperatorFactory] = None,
                 layout: Optional[TokenLayout] = None, **kwargs: Any) -> None:
        if not batch_first:
            raise ValueError("KArAtMultiheadAttention works on batch-first tokens (B, N, C); set batch_first=True.")
        super().__init__(embed_dims, num_heads, attn_drop, proj_drop, dropout_layer, init_cfg, batch_first, **kwargs)
        self.karat = KArAtCore(num_heads, num_tokens, karat_cfg, operator_factory, attn_drop, layout=layout)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                identity: Optional[torch.Tensor] = None, query_pos: Optional[torch.Tensor] = None,
                key_mask: Optional[torch.Tensor] = None, layout: Optional[TokenLayout] = None,
                **unsupported: Any) -> torch.Tensor:
        """Self-attention of ``query`` (B, N, C); ``key_mask`` bool broadcastable to (B, H, N, N), False = masked;
        ``layout``: the tokens' layout when it is not the one the model was built for."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("KArAtMultiheadAttention is self-attention only (its operator is indexed by the "
                             "query's own token positions); do not pass a different key/value.")
        given = sorted(k for k, v in unsupported.items() if v is not None)
        if given:
            raise ValueError(f"KArAtMultiheadAttention does not take {given}; pass a boolean key_mask instead.")
        identity = query if identity is None else identity
        if query_pos is not None:
            query = query + query_pos
        b, n, c = query.shape
        h = self.num_heads
        qkv = F.linear(query, self.attn.in_proj_weight, self.attn.in_proj_bias)  # rows: q, k, v (torch's order)
        q, k, v = qkv.reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = self.karat(q, k, v, key_mask=key_mask, layout=layout)
        out = self.attn.out_proj(out.transpose(1, 2).reshape(b, n, c))
        return identity + self.dropout_layer(self.proj_drop(out))


@SEG_MODELS.register_module()
class KArAtVisionTransformer(VisionTransformer):
    """mmseg's ``VisionTransformer`` with KArAt attention in every layer; it takes every input size mmseg's does.

    The operator is stored for the token layout of ``img_size`` (its patches plus the class token when
    ``with_cls_token``). An input no larger than ``img_size`` (the last window of a slide inference, a detector's
    padded batch) is padded to it and the padded keys masked out; the outputs are cropped back. A larger one (in
    either direction: ``mode='whole'`` inference, multi-scale training) is padded to at least ``img_size`` the same
    way, and its grid evaluated with the operators resampled to it at run time (spec section 6), as mmseg
    interpolates the position embedding on every forward.

    Args:
        **kwargs: mmseg ``VisionTransformer`` options plus KArAt options (``KArAtConfig`` field names,
            ``karat_depth`` for the KAN depth), e.g. ``basis_type='FourierBasis', grid=3, hidden_dim=12``.
    """

    def __init__(self, **kwargs: Any) -> None:
        cfg = _pop_karat_options(kwargs, VisionTransformer, type(self).__name__)
        super().__init__(**kwargs)
        ph, pw = to_2tuple(self.patch_size)
        if self.img_size[0] % ph or self.img_size[1] % pw:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}; KArAt "
                             f"needs a whole grid of patches to fix its token count.")
        self.grid = (self.img_size[0] // ph, self.img_size[1] // pw)
        self.num_tokens = self.grid[0] * self.grid[1] + int(self.with_cls_token)
        self.karat_cfg = cfg
        provider = OperatorProvider(cfg)  # one per model: universal sharing spans its layers only
        for layer in self.layers:
            old = layer.attn
            new = KArAtMultiheadAttention(
                old.embed_dims, old.num_heads, attn_drop=old.attn.dropout, proj_drop=old.proj_drop.p,
                dropout_layer=None, batch_first=True, bias=old.attn.in_proj_bias is not None,
                karat_cfg=cfg, num_tokens=self.num_tokens, operator_factory=provider,
                layout=TokenLayout(int(self.with_cls_token), self.grid))
            new.dropout_layer = old.dropout_layer
            layer.attn = new
        self.load_report: Optional[convert.LoadReport] = None
        self._freeze()  # frozen_exclude applies to the new attention parameters too

    # -- pretrained weights ------------------------------------------------------------------------
    def init_weights(self) -> None:
        """mmseg / timm ViT or converted KArAt checkpoints through ``init_cfg=dict(type='Pretrained', ...)``:
        timm names are mapped, position embeddings and KArAt weights resampled to this model's grid, and a
        report of what was loaded / resampled / newly initialised is logged (``self.load_report``)."""
        if not _is_pretrained(self.init_cfg):
            super().init_weights()
            return
        checkpoint = self.init_cfg["checkpoint"]
        state = convert.read_backbone_state(checkpoint)
        state, report = convert.fit_vit_state(state, self)
        self.load_state_dict(state, strict=False)
        self.load_report = report
        print_log(f"{type(self).__name__}: weights from {checkpoint}\n{report}", logger="current")

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor) -> Tuple[Any, ...]:
        b, _, h, w = inputs.shape
        H, W = max(h, self.img_size[0]), max(w, self.img_size[1])  # never below the built size: padded and masked
        if (h, w) != (H, W):
            inputs = F.pad(inputs, (0, W - w, 0, H - h))
        ph, pw = to_2tuple(self.patch_size)
        valid = (math.ceil(h / ph), math.ceil(w / pw))

        x, hw_shape = self.patch_embed(inputs)  # mmseg pads to whole patches
        grid = tuple(hw_shape)
        key_mask = None if valid == grid else self._padding_key_mask(grid, valid, inputs.device)
        layout = TokenLayout(int(self.with_cls_token), grid)  # the built one, or the operators are resampled to it
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = self._pos_embeding(x, hw_shape, self.pos_embed)  # mmseg interpolates it to the grid
        if not self.with_cls_token:
            x = x[:, 1:]
        if self.pre_norm:
            x = self.pre_ln(x)

        outs: List[Any] = []
        if self.out_origin:
            outs.append(self._feature_map(x, grid, valid))
        for i, layer in enumerate(self.layers):
            x = self._run_layer(layer, x, key_mask, layout)
            if i == len(self.layers) - 1 and self.final_norm:
                x = self.norm1(x)
            if i in self.out_indices:
                outs.append(self._feature_map(x, grid, valid))
        return tuple(outs)

    def _padding_key_mask(self, grid: Tuple[int, int], valid: Tuple[int, int], device: torch.device) -> torch.Tensor:
        keep = torch.zeros(grid, dtype=torch.bool, device=device)
        keep[: valid[0], : valid[1]] = True
        keep = keep.flatten()
        if self.with_cls_token:
            keep = torch.cat([keep.new_ones(1), keep])
        return keep.view(1, 1, 1, -1)

    def _run_layer(self, layer: nn.Module, x: torch.Tensor, key_mask: Optional[torch.Tensor],
                   layout: Optional[TokenLayout] = None) -> torch.Tensor:
        def inner(x: torch.Tensor) -> torch.Tensor:
            x = layer.attn(layer.norm1(x), identity=x, key_mask=key_mask, layout=layout)
            return layer.ffn(layer.norm2(x), identity=x)

        if layer.with_cp and x.requires_grad:
            return cp.checkpoint(inner, x, use_reentrant=False)
        return inner(x)

    def _feature_map(self, x: torch.Tensor, grid: Tuple[int, int], valid: Tuple[int, int]) -> Any:
        tokens = x[:, 1:] if self.with_cls_token else x
        b, _, c = tokens.shape
        out = tokens.reshape(b, *grid, c)[:, : valid[0], : valid[1]].permute(0, 3, 1, 2).contiguous()
        return [out, x[:, 0]] if self.output_cls_token else out


# ------------------------------------------------------------------------------------------------------
# Swin Transformer
# ------------------------------------------------------------------------------------------------------
class KArAtWindowMSA(WindowMSA):
    """mmseg's window attention (same parameters) with KArAt in place of the softmax."""

    def __init__(self, *args: Any, karat_cfg: KArAtConfig, operator_factory: Optional[OperatorFactory] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        area = self.window_size[0] * self.window_size[1]
        self.karat = KArAtCore(self.num_heads, area, karat_cfg, operator_factory, self.attn_drop.p)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: ``(num_windows * B, N, C)``; ``key_mask``: bool ``(num_windows * B, 1, N, N)``, False = masked.
        ``mask`` (mmseg's additive ``(num_windows, N, N)`` mask) is accepted too: its non-zero entries mask."""
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if mask is not None:
            num_win = mask.shape[0]
            keep = (mask == 0).view(1, num_win, 1, n, n).expand(b_ // num_win, -1, -1, -1, -1).reshape(b_, 1, n, n)
            key_mask = keep if key_mask is None else key_mask & keep
        out = self.karat(q, k, v, bias=self.relative_position_bias(), key_mask=key_mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b_, n, c)
        return self.proj_drop(self.proj(out))


class KArAtShiftWindowMSA(ShiftWindowMSA):
    """mmseg's (shifted) window attention whose masks reach KArAt as boolean key masks: a key is visible to
    a query when both lie in the same shifted-window region and the key is not padding."""

    def __init__(self, *args: Any, karat_cfg: KArAtConfig, operator_factory: Optional[OperatorFactory] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        old = self.w_msa
        self.w_msa = KArAtWindowMSA(
            embed_dims=old.embed_dims, num_heads=old.num_heads, window_size=old.window_size,
            qkv_bias=old.qkv.bias is not None, qk_scale=old.scale, attn_drop_rate=old.attn_drop.p,
            proj_drop_rate=old.proj_drop.p, karat_cfg=karat_cfg, operator_factory=operator_factory)

    def window_keep_mask(self, hw: Tuple[int, int], batch: int, device: torch.device) -> Optional[torch.Tensor]:
        """Bool ``(num_windows * batch, 1, N, N)`` (query, key) visibility, or None when nothing is masked."""
        H, W = hw
        ws, shift = self.window_size, self.shift_size
        H_pad, W_pad = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
        if shift == 0 and (H_pad, W_pad) == (H, W):
            return None
        valid = torch.zeros((1, H_pad, W_pad, 1), device=device)
        valid[:, :H, :W] = 1
        region = torch.zeros((1, H_pad, W_pad, 1), device=device)
        if shift > 0:
            cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
            for i, (hs, wsl) in enumerate((a, b) for a in cuts for b in cuts):
                region[:, hs, wsl] = i
            valid = torch.roll(valid, shifts=(-shift, -shift), dims=(1, 2))  # region ids are laid out post-shift
        n = ws * ws
        valid_w = self.window_partition(valid).view(-1, n) > 0
        region_w = self.window_partition(region).view(-1, n)
        keep = (region_w.unsqueeze(1) == region_w.unsqueeze(2)) & valid_w.unsqueeze(1)  # (nW, N_q, N_k)
        num_win = keep.shape[0]
        return keep.view(1, num_win, 1, n, n).expand(batch, -1, -1, -1, -1).reshape(batch * num_win, 1, n, n)

    def window_reverse(self, windows: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """mmseg's, with the batch size left to ``view``: mmseg's ``int(windows.shape[0] / ...)`` freezes the batch
        size an exported graph was traced with (an ONNX graph would then give wrong outputs at any other)."""
        ws = self.window_size
        x = windows.view(-1, H // ws, W // ws, ws, ws, windows.shape[-1])
        return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, windows.shape[-1])

    def forward(self, query: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        b, length, c = query.shape
        H, W = hw_shape
        if length != H * W:
            raise ValueError(f"input has {length} tokens, hw_shape {hw_shape} says {H * W}")
        ws, shift = self.window_size, self.shift_size
        x = query.view(b, H, W, c)
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        H_pad, W_pad = x.shape[1], x.shape[2]
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.window_partition(x).view(-1, ws * ws, c)
        keep = self.window_keep_mask((H, W), b, query.device)
        out = self.w_msa(windows, key_mask=keep).view(-1, ws, ws, c)
        x = self.window_reverse(out, H_pad, W_pad)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :H, :W, :].reshape(b, H * W, c)
        return self.drop(x)


@SEG_MODELS.register_module()
class KArAtSwinTransformer(SwinTransformer):
    """mmseg's ``SwinTransformer`` (all its options, parameter names kept) with KArAt window attention.

    Args:
        **kwargs: mmseg ``SwinTransformer`` options plus KArAt options (``KArAtConfig`` field names).
    """

    def __init__(self, **kwargs: Any) -> None:
        cfg = _pop_karat_options(kwargs, SwinTransformer, type(self).__name__)
        super().__init__(**kwargs)
        self.karat_cfg = cfg
        provider = OperatorProvider(cfg)
        for stage in self.stages:
            for block in stage.blocks:
                old = block.attn
                new = KArAtShiftWindowMSA(
                    embed_dims=old.w_msa.embed_dims, num_heads=old.w_msa.num_heads, window_size=old.window_size,
                    shift_size=old.shift_size, qkv_bias=old.w_msa.qkv.bias is not None, qk_scale=old.w_msa.scale,
                    attn_drop_rate=old.w_msa.attn_drop.p, proj_drop_rate=old.w_msa.proj_drop.p,
                    karat_cfg=cfg, operator_factory=provider)
                new.drop = old.drop
                block.attn = new
        self.load_report: Optional[convert.LoadReport] = None
        self._freeze_stages()

    def init_weights(self) -> None:
        """Checks a pretrained checkpoint first (only KArAt tensors may be missing; KArAt tensors must fit
        this window size), then loads it the way mmseg's Swin does and logs the report."""
        if _is_pretrained(self.init_cfg):
            state = convert.read_backbone_state(self.init_cfg["checkpoint"])
            self.load_report = convert.check_backbone_state(
                state, self, ignore_missing=("relative_position_index",), allow_new=_swin_output_norms(self))
            super().init_weights()
            print_log(f"{type(self).__name__}: weights from {self.init_cfg['checkpoint']}\n{self.load_report}",
                      logger="current")
            return
        super().init_weights()


def _swin_output_norms(model: SwinTransformer) -> Sequence[str]:
    """The per-output norms (``norm0``...) are mmseg's own, absent from classification checkpoints."""
    return tuple(f"norm{i}." for i in model.out_indices)


if DET_MODELS is not None:
    DET_MODELS.register_module(module=KArAtVisionTransformer)
    DET_MODELS.register_module(module=KArAtSwinTransformer)
