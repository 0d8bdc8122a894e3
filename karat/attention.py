"""Attention with KArAt in place of softmax.

``KArAtCore`` is the one piece every host uses unchanged (timm ViT/Swin/ConViT, detectron2 ViTDet,
mmseg/mmdet backbones): it takes per-head ``q, k, v`` plus the host's relative-position bias and key
mask, and returns the per-head output. ``KArAtAttention`` wraps it as a drop-in ``attn_layer`` for
timm's ``VisionTransformer`` with timm's parameter names (``qkv``, ``q_norm``, ``k_norm``, ``norm``,
``proj``), so softmax ViT weights load into it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module

from . import kernels
from .config import KArAtConfig
from .flops import trace_core_call
from .operator import KArAtOperator, OperatorProvider
from .relpos import Bias, DecomposedRelPos, dense_bias
from .resample import TokenLayout, is_symbolic, operator_at, resample_operator

OperatorFactory = Callable[[int, int], KArAtOperator]

# Every host names its KArAtCore ``karat``, so KArAt tensors are recognisable by name in any host's checkpoint.
KARAT_KEY = ".karat."


def is_karat_key(name: str) -> bool:
    """Whether a parameter / state-dict name belongs to a KArAt core (``...attn.karat.operator.*``)."""
    return KARAT_KEY in f".{name}"


def mask_to_keep(attn_mask: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Split an SDPA-style mask into (bool keep-mask, additive bias).

    A bool mask is True where attention is allowed. A float mask is additive: ``-inf`` entries mask the
    key (KArAt semantics), finite entries are a bias added to the logits.
    """
    if attn_mask is None:
        return None, None
    if attn_mask.dtype == torch.bool:
        return attn_mask, None
    keep = ~torch.isneginf(attn_mask)
    return (None if bool(keep.all()) else keep), attn_mask.masked_fill(~keep, 0.0)


class InputLayout:
    """Where a host model leaves the token layout of its current input for its attentions, which timm's ``Block``
    calls with the tokens only: the model sets ``layout`` when it embeds the patches (it knows the grid), every
    attention of the model reads it."""

    def __init__(self) -> None:
        self.layout: Optional[TokenLayout] = None

    def get(self, num_tokens: int) -> Optional[TokenLayout]:
        """The current layout if it describes ``num_tokens`` tokens, else None (the core then wants its own)."""
        layout = self.layout
        return layout if layout is not None and layout.num_tokens == num_tokens else None


# torch.fx sees the core as one leaf call (timm's way for modules whose forward branches on shapes and flags:
# token-count check, impl choice, mixed heads), so timm's fx feature extraction traces every host around it.
@register_notrace_module
class KArAtCore(nn.Module):
    """Per-head attention output ``sigma(S) V`` for the first ``k`` heads and ``softmax(S) V`` for the rest.

    Args:
        num_heads: heads of the host attention.
        num_tokens: keys each head sees (N); the operator's weights are indexed by key position.
        cfg: KArAt options.
        operator_factory: builds (or, for universal sharing, returns the shared) operator.
        attn_drop: dropout on the attention weights, as in timm.
        layout: the token layout the operator is stored for (prefix tokens + grid). With it, the core accepts any
            other layout the host passes to :meth:`forward` (spec section 6, run time); without it, only
            ``num_tokens`` keys.
    """

    def __init__(self, num_heads: int, num_tokens: int, cfg: KArAtConfig,
                 operator_factory: Optional[OperatorFactory] = None, attn_drop: float = 0.0,
                 layout: Optional[TokenLayout] = None) -> None:
        super().__init__()
        if layout is not None and layout.num_tokens != num_tokens:
            raise ValueError(f"layout {layout} has {layout.num_tokens} tokens, not num_tokens={num_tokens}")
        self.cfg, self.num_heads, self.num_tokens, self.layout = cfg, num_heads, num_tokens, layout
        self.input_layout: Optional[InputLayout] = None  # where a host model says its current input's layout
        self.num_karat_heads = cfg.karat_heads(num_heads)
        factory = operator_factory or OperatorProvider(cfg)
        self.operator = factory(self.num_karat_heads, num_tokens)
        self.attn_drop = nn.Dropout(attn_drop)
        self.export_attention = False  # set True to keep the last sigma(S) in ``last_attention``
        self.last_attention: Optional[torch.Tensor] = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[Bias] = None,
                key_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                layout: Optional[TokenLayout] = None) -> torch.Tensor:
        """q, k, v: ``(B, H, N, d)``; bias: additive, broadcastable to ``(B, H, N, N)``, or a
        :class:`~karat.relpos.DecomposedRelPos` (the fused kernels add it in-kernel); key_mask: bool,
        broadcastable to ``(B, H, N, N)``, False where a key is masked; layout: the keys' token layout, from the
        host, which knows its grid (needed when it is not the stored one). Returns ``(B, H, N, d)``."""
        if not torch.jit.is_scripting() and torch.jit.is_tracing():  # a FLOP counter sees one op per call
            traced = trace_core_call(self, q, k, v, dense_bias(bias), key_mask, scale, layout)
            if traced is not None:
                return traced
        if layout is None and self.input_layout is not None:
            layout = self.input_layout.get(k.shape[-2])
        op = self.operator_for(k.shape[-2], layout)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        h = self.num_karat_heads
        if h == self.num_heads:  # every head is KArAt (the usual case): no slicing, one op fewer per tensor
            return self._karat(op, q, k, v, bias, key_mask, scale)
        out_karat = self._karat(op, q[:, :h], k[:, :h], v[:, :h], _heads(bias, 0, h), _heads(key_mask, 0, h), scale)
        out_soft = self._softmax(q[:, h:], k[:, h:], v[:, h:], dense_bias(_heads(bias, h, None)),
                                 _heads(key_mask, h, None), scale)
        return torch.cat([out_karat, out_soft], dim=1)

    def operator_for(self, num_keys: int, layout: Optional[TokenLayout] = None) -> KArAtOperator:
        """The operator that evaluates ``num_keys`` keys laid out as ``layout``: the stored one for the stored
        layout, else the stored one resampled to ``layout`` (``karat.resample.operator_at``: differentiable,
        cached outside training). The host names the layout; a grid is never guessed from a token count."""
        if layout is not None and layout.num_tokens != num_keys:
            raise ValueError(f"The host passed layout={layout} ({layout.num_tokens} tokens) for {num_keys} keys.")
        if layout is None or (not is_symbolic(layout) and layout == self.layout):  # a symbolic one: resampled
            if num_keys != self.num_tokens:
                raise ValueError(
                    f"KArAt attention was built for {self.num_tokens} tokens but got {num_keys}, and the host gave "
                    f"no token layout. Its weights are indexed by key position: to evaluate another size, the host "
                    f"must pass layout=TokenLayout(prefix, (h, w)) and build the core with its stored layout.")
            return self.operator
        if self.layout is None:
            raise ValueError(f"This KArAt core was built without its token layout (KArAtCore(..., layout=...)), so "
                             f"it cannot resample its operator to {layout}; it takes {self.num_tokens} tokens only.")
        return operator_at(self.operator, self.layout, layout)

    def resample_(self, src: TokenLayout, dst: TokenLayout) -> None:
        """Move to another token layout in place (a new window or image size): the operator's weights are
        resampled with ``karat.resample`` (spec section 6), the way timm resizes its position tables."""
        self.operator = resample_operator(self.operator, src, dst)
        self.num_tokens, self.layout = dst.num_tokens, dst

    def choose_path(self, q: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    key_mask: Optional[torch.Tensor] = None, op: Optional[KArAtOperator] = None) -> kernels.Choice:
        """The evaluation path for this call (``karat.kernels.choose``; ``op``: the operator evaluated, by default
        the stored one), with why faster ones were passed over: attention-map export and attention dropout while
        training need the materialised sigma(S)."""
        needs_sigma = None
        if self.export_attention:
            needs_sigma = "exporting attention maps needs sigma(S) itself"
        elif self.training and self.attn_drop.p > 0:
            needs_sigma = "attention dropout acts on the entries of sigma(S)"
        return kernels.choose(self.operator if op is None else op, self.cfg.impl, q, bias, key_mask, needs_sigma)

    def resolve_impl(self, q: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                     key_mask: Optional[torch.Tensor] = None) -> str:
        """``reference``, ``efficient`` or ``fused``: the path :meth:`choose_path` picks from ``cfg.impl``."""
        return self.choose_path(q, bias, key_mask).path

    def _karat(self, op, q, k, v, bias, key_mask, scale) -> torch.Tensor:
        choice = self.choose_path(q, bias, key_mask, op)
        if choice.path == "reference":
            return kernels.reference.attend(op, q, k, v, dense_bias(bias), key_mask, scale, on_sigma=self._on_sigma)
        return kernels.attend(choice, op, q, k, v, bias, key_mask, scale, strict=self.cfg.impl == "fused")

    def _on_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.export_attention:
            self.last_attention = sigma.detach()
        return self.attn_drop(sigma)

    def _softmax(self, q, k, v, bias, key_mask, scale) -> torch.Tensor:
        mask = bias
        if key_mask is not None:
            mask = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
            mask = mask if bias is None else mask + bias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              dropout_p=self.attn_drop.p if self.training else 0.0)

    def extra_repr(self) -> str:
        tokens = self.num_tokens if self.layout is None else f"{self.num_tokens} ({self.layout.prefix}+" \
            f"{self.layout.grid[0]}x{self.layout.grid[1]})"
        return f"karat_heads={self.num_karat_heads}/{self.num_heads}, tokens={tokens}"


def _heads(t: Optional[Bias], start: int, stop: Optional[int]) -> Optional[Bias]:
    """Slice the head axis of a ``(B, H, N, N)``-broadcastable tensor (left alone where it broadcasts)."""
    if isinstance(t, DecomposedRelPos):
        return t.heads(start, stop)
    if t is None or t.dim() < 4 or t.shape[1] == 1:
        return t
    return t[:, start:stop]


@register_notrace_function  # fx: which branch depends on the mask's type and values (timm passes them as inputs)
def split_attn_mask(attn_mask: Optional[torch.Tensor], is_causal: bool = False
                    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """timm's attention-mask arguments as (bool keep-mask, additive bias), see :func:`mask_to_keep`."""
    if is_causal:
        raise ValueError("KArAt attention has no causal mode; pass a boolean attn_mask instead")
    return mask_to_keep(attn_mask)


class KArAtAttention(nn.Module):
    """Drop-in ``attn_layer`` for ``timm.models.vision_transformer.VisionTransformer``.

    timm's ``Block`` builds it from a class with timm's attention keywords, so the KArAt ones
    (``karat_cfg``, ``num_tokens``, ``operator_factory``, ``layout``, ``input_layout``) are bound into a subclass
    with :meth:`bind`. ``layout`` is the token layout the operator is stored for; ``input_layout`` is where the
    model says which layout its current input has (any other is evaluated with the operator resampled to it).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Optional[type[nn.Module]] = None, *, karat_cfg: KArAtConfig, num_tokens: int,
                 operator_factory: Optional[OperatorFactory] = None, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, device=None, dtype=None, layout: Optional[TokenLayout] = None,
                 input_layout: Optional[InputLayout] = None, **unused) -> None:
        super().__init__()
        if unused:
            raise TypeError(f"KArAtAttention does not support {sorted(unused)}")
        head_dim = attn_head_dim or dim // num_heads
        if attn_head_dim is None and dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is set")
        self.num_heads, self.head_dim, self.attn_dim = num_heads, head_dim, num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.karat = KArAtCore(num_heads, num_tokens, karat_cfg, operator_factory, attn_drop, layout=layout)
        self.karat.input_layout = input_layout  # read inside the core: torch.fx traces around it
        self.norm = norm_layer(self.attn_dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @classmethod
    def bind(cls, karat_cfg: KArAtConfig, num_tokens: int, operator_factory: Optional[OperatorFactory] = None,
             layout: Optional[TokenLayout] = None, input_layout: Optional[InputLayout] = None
             ) -> type["KArAtAttention"]:
        """A subclass whose constructor takes only timm's attention arguments (timm wants a class)."""
        factory = operator_factory or OperatorProvider(karat_cfg)

        class BoundKArAtAttention(cls):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, karat_cfg=karat_cfg, num_tokens=num_tokens, operator_factory=factory,
                                 layout=layout, input_layout=input_layout, **kwargs)

        BoundKArAtAttention.__name__ = BoundKArAtAttention.__qualname__ = cls.__name__
        return BoundKArAtAttention

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        """x: ``(B, N, C)``; layout: the tokens' layout, by default what the model set in ``input_layout``."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        keep, bias = split_attn_mask(attn_mask, is_causal)
        x = self.karat(q, k, v, bias=bias, key_mask=keep, scale=self.scale, layout=layout)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        x = self.proj(x)
        return self.proj_drop(x)
