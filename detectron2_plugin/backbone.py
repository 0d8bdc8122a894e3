"""ViTDet's plain ViT backbone with KArAt attention in every block (detectron2 idiom).

``KArAtViT`` is detectron2's own ``ViT`` (patch embedding, absolute position embedding interpolated at run time,
windowed and global blocks, decomposed relative-position bias, drop path, residual blocks) whose attentions are
replaced by :class:`KArAtViTAttention`. That attention keeps detectron2's parameter names (``qkv``, ``proj``,
``rel_pos_h``, ``rel_pos_w``), computes the relative-position bias the way detectron2 does and hands it to
``karat.KArAtCore`` as an additive logits bias. Windowed blocks pad the feature map to a multiple of the window;
without a softmax, an additive ``-inf`` masks nothing, so the padded tokens are passed as masked keys instead.
Global blocks tell the core the grid they see, so an input of any size is evaluated with the operator resampled to it.

Only this module knows detectron2; ``karat`` itself does not.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint
from detectron2.modeling.backbone.utils import get_abs_pos, get_rel_pos, window_partition, window_unpartition
from detectron2.modeling.backbone.vit import Block, ViT

from karat import KArAtConfig, KArAtCore, OperatorProvider, TokenLayout
from karat.attention import OperatorFactory
from karat.config import config_from_kwargs
from karat.relpos import DecomposedRelPos

__all__ = ["KArAtViT", "KArAtViTAttention", "KArAtBlock", "karat_config_from", "decomposed_rel_pos",
           "decomposed_rel_pos_bias", "padded_window_key_mask"]


def karat_config_from(options: Optional[Mapping[str, Any]]) -> KArAtConfig:
    """A ``KArAtConfig`` from config data: a mapping of KArAt option names (``karat_depth`` for the KAN depth),
    an OmegaConf node, or a ready ``KArAtConfig``."""
    if isinstance(options, KArAtConfig):
        return options
    if options is None:
        return config_from_kwargs({})
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(options, DictConfig):
            options = OmegaConf.to_container(options, resolve=True)
    except ImportError:  # pragma: no cover - detectron2 always brings omegaconf
        pass
    if not isinstance(options, Mapping):
        raise TypeError(f"KArAt options must be a mapping of option names to values, got {type(options).__name__}.")
    return config_from_kwargs(options, where="the backbone's karat=dict(...)")


def decomposed_rel_pos(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                       q_size: Tuple[int, int], k_size: Tuple[int, int]) -> DecomposedRelPos:
    """detectron2's decomposed relative-position term (MViTv2) as a logits bias kept in its two small terms, so
    the fused kernels add it per tile and nothing builds it as N x N (other paths expand it).

    q: ``(B, heads, q_h * q_w, d)`` (unscaled, as detectron2 uses it). Its :meth:`~DecomposedRelPos.dense` is
    what ``add_decomposed_rel_pos`` would add to the attention logits."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    rh = get_rel_pos(q_h, k_h, rel_pos_h)
    rw = get_rel_pos(q_w, k_w, rel_pos_w)
    b, heads, _, dim = q.shape
    r_q = q.reshape(b, heads, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).reshape(b, heads, q_h * q_w, k_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).reshape(b, heads, q_h * q_w, k_w)
    return DecomposedRelPos(rel_h, rel_w)


def decomposed_rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                            q_size: Tuple[int, int], k_size: Tuple[int, int]) -> torch.Tensor:
    """The same bias as one ``(B, heads, q_h*q_w, k_h*k_w)`` tensor."""
    return decomposed_rel_pos(q, rel_pos_h, rel_pos_w, q_size, k_size).dense()


def padded_window_key_mask(hw: Tuple[int, int], pad_hw: Tuple[int, int], window_size: int, batch: int,
                           device: torch.device) -> Optional[torch.Tensor]:
    """Key mask of ``window_partition``'s output: False for the zero tokens it padded in, ``(B*nW, 1, 1, N)``
    in the same window order; None when nothing was padded."""
    (h, w), (hp, wp) = hw, pad_hw
    if (h, w) == (hp, wp):
        return None
    valid = torch.zeros(hp, wp, dtype=torch.bool, device=device)
    valid[:h, :w] = True
    ws = window_size
    windows = valid.view(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    return windows.repeat(batch, 1).view(-1, 1, 1, ws * ws)


class KArAtViTAttention(nn.Module):
    """detectron2's ViTDet ``Attention`` (same parameters and rel-pos bias) with KArAt in place of softmax."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, input_size: Optional[Tuple[int, int]] = None, *,
                 karat_cfg: KArAtConfig, operator_factory: Optional[OperatorFactory] = None) -> None:
        super().__init__()
        if input_size is None:
            raise ValueError("KArAt attention needs input_size (its operator weights are indexed by token position).")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.input_size = tuple(input_size)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
        self.karat = KArAtCore(num_heads, input_size[0] * input_size[1], karat_cfg, operator_factory,
                               layout=TokenLayout(0, self.input_size))

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: ``(B, H, W, C)``, any ``H x W`` (a global block at another image size: the operator is evaluated
        resampled to it, as detectron2 interpolates its position tables); key_mask: bool broadcastable to
        ``(B, heads, HW, HW)``, False = padded key."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, HW, d)
        bias = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)) if self.use_rel_pos else None
        out = self.karat(q, k, v, bias=bias, key_mask=key_mask, scale=self.scale, layout=TokenLayout(0, (h, w)))
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


class KArAtBlock(Block):
    """detectron2's ViTDet ``Block`` with :class:`KArAtViTAttention`; window padding becomes a key mask."""

    def __init__(self, dim: int, num_heads: int, *, karat_cfg: KArAtConfig,
                 operator_factory: Optional[OperatorFactory] = None, qkv_bias: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, window_size: int = 0,
                 input_size: Optional[Tuple[int, int]] = None, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                         rel_pos_zero_init=rel_pos_zero_init, window_size=window_size, input_size=input_size,
                         **kwargs)
        self.attn = KArAtViTAttention(
            dim, num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            karat_cfg=karat_cfg, operator_factory=operator_factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        key_mask = None
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            batch = x.shape[0]
            x, pad_hw = window_partition(x, self.window_size)
            key_mask = padded_window_key_mask(hw, pad_hw, self.window_size, batch, x.device)
        x = self.attn(x, key_mask)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, hw)
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.use_residual_block:
            x = self.residual(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x


class KArAtViT(ViT):
    """detectron2's ViTDet backbone with KArAt attention (same arguments as ``ViT`` plus ``karat``).

    Args:
        karat: KArAt options (``KArAtConfig`` field names, ``karat_depth`` for the KAN depth), e.g.
            ``dict(basis_type="FourierBasis", grid=1, hidden_dim=12, universal=True)``.
        use_act_checkpoint: recompute each block in backward (``torch.utils.checkpoint``; detectron2's ViT
            needs fairscale for this, this backbone does not). Parameter names are unchanged.

    Windowed blocks see ``window_size ** 2`` tokens (detectron2 pads the map to whole windows; the padding is
    masked). Global blocks store their operator for ``(img_size // patch_size) ** 2`` tokens and take any grid, below
    or above ``img_size``, square or not, with or without ``square_pad``: the operator is evaluated resampled to the
    input's grid (spec section 6), as detectron2 interpolates its position embedding and relative-position tables.
    One ``OperatorProvider``
    serves the whole backbone, so ``universal=True`` shares one operator per (heads, tokens) across blocks.
    """

    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, norm_layer: Any = nn.LayerNorm, act_layer: Any = nn.GELU,
                 use_abs_pos: bool = True, use_rel_pos: bool = False, rel_pos_zero_init: bool = True,
                 window_size: int = 0, window_block_indexes: Any = (), residual_block_indexes: Any = (),
                 use_act_checkpoint: bool = False, pretrain_img_size: int = 224, pretrain_use_cls_token: bool = True,
                 out_feature: str = "last_feat", karat: Optional[Mapping[str, Any]] = None) -> None:
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}.")
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
            norm_layer=norm_layer, act_layer=act_layer, use_abs_pos=use_abs_pos, use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init, window_size=window_size, window_block_indexes=window_block_indexes,
            residual_block_indexes=residual_block_indexes, use_act_checkpoint=False,
            pretrain_img_size=pretrain_img_size, pretrain_use_cls_token=pretrain_use_cls_token,
            out_feature=out_feature)
        self.karat_cfg = karat_config_from(karat)
        self.use_act_checkpoint = use_act_checkpoint
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        provider = OperatorProvider(self.karat_cfg)
        dpr = [float(v) for v in torch.linspace(0, drop_path_rate, depth)]
        window_blocks = set(window_block_indexes)
        self.blocks = nn.ModuleList(
            KArAtBlock(embed_dim, num_heads, karat_cfg=self.karat_cfg, operator_factory=provider, mlp_ratio=mlp_ratio,
                       qkv_bias=qkv_bias, drop_path=dpr[i], norm_layer=norm_layer, act_layer=act_layer,
                       use_rel_pos=use_rel_pos, rel_pos_zero_init=rel_pos_zero_init,
                       window_size=window_size if i in window_blocks else 0,
                       use_residual_block=i in residual_block_indexes, input_size=self.grid_size)
            for i in range(depth))
        self.blocks.apply(self._init_weights)  # the same initialisation detectron2's ViT gives its blocks

    def block_layouts(self) -> Dict[int, Tuple[int, int]]:
        """Block index -> the token grid its attention sees (window or whole feature map)."""
        return {i: blk.attn.input_size for i, blk in enumerate(self.blocks)}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        for blk in self.blocks:
            if self.use_act_checkpoint and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return {self._out_features[0]: x.permute(0, 3, 1, 2)}
