"""Attention matrices of a timm ViT (softmax or KArAt, mixed heads included) and attention rollout.

KArAt heads give the operator's ``sigma(S)`` (kept by ``KArAtCore.export_attention``, which makes the core take
the reference path); softmax heads give ``softmax(q k^T / sqrt(d))``, recomputed from the block's input by a
forward hook (timm's attention uses fused SDPA and never forms it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..attention import KArAtAttention


@dataclass
class AttentionRecord:
    """Per block: ``maps[i]`` ``(B, H, N, N)`` attention weights, ``logits[i]`` the scaled ``q k^T`` they come from,
    and ``karat_heads[i]`` how many of the block's heads (the first ones) are KArAt."""

    maps: List[torch.Tensor]
    logits: List[torch.Tensor]
    karat_heads: List[int]


def _logits(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    qkv = mod.qkv(x).reshape(b, n, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k = mod.q_norm(qkv[0]), mod.k_norm(qkv[1])
    return (q * mod.scale) @ k.transpose(-2, -1)


@torch.no_grad()
def record_attention(model: nn.Module, images: torch.Tensor) -> AttentionRecord:
    """Run ``model`` on ``images`` once and keep every block's attention weights and logits."""
    logits: Dict[int, torch.Tensor] = {}
    hooks = []
    cores = {}
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if isinstance(attn, KArAtAttention):
            attn.karat.export_attention = True
            cores[i] = attn.karat

        def hook(mod, args, _out, _i=i):
            logits[_i] = _logits(mod, args[0])

        hooks.append(attn.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    maps: List[torch.Tensor] = []
    heads: List[int] = []
    try:
        model(images)
        for i in range(len(model.blocks)):
            att = logits[i].softmax(-1)
            k = cores[i].num_karat_heads if i in cores else 0
            if k:
                att = torch.cat([cores[i].last_attention, att[:, k:]], dim=1)
            maps.append(att)
            heads.append(k)
    finally:
        for h in hooks:
            h.remove()
        for core in cores.values():
            core.export_attention, core.last_attention = False, None
        model.train(was_training)
    return AttentionRecord(maps, [logits[i] for i in range(len(model.blocks))], heads)


def attention_maps(model: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """Per block, a ``(B, H, N, N)`` tensor of attention weights (KArAt heads: ``sigma(S)``)."""
    return record_attention(model, images).maps


def attention_rollout(maps: List[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) over blocks: ``R = A_L ... A_1`` with
    ``A_l = residual I + (1 - residual) |mean_h W_l| / row sum``, ``(B, N, N)``.

    KArAt rows are neither positive nor normalised; their magnitudes are normalised per row, so rollout reads
    as "how much each token draws, directly or through earlier blocks, on each input token"."""
    b, _, n, _ = maps[0].shape
    eye = torch.eye(n, dtype=maps[0].dtype, device=maps[0].device).expand(b, n, n)
    out = eye.clone()
    for w in maps:
        a = w.abs().mean(1)
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        out = (residual * eye + (1 - residual) * a) @ out
    return out


def _patch_map(values: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """The last ``h * w`` entries (the patches, after any prefix tokens) as an ``(h, w)`` image."""
    return values[-grid[0] * grid[1]:].reshape(*grid)


def plot_attention_grid(named: Dict[str, AttentionRecord], path: str, image_index: int = 0,
                        blocks: Optional[Sequence[int]] = None) -> None:
    """Every block (rows) and head (columns) of every model as its ``N x N`` attention matrix for one image:
    KArAt's ``sigma(S)`` next to softmax. Diverging colours centred on zero (KArAt weights may be negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(named)
    shown = list(blocks) if blocks is not None else list(range(max(len(r.maps) for r in named.values())))
    depth = len(shown)
    cols = [(name, h) for name in names for h in range(named[name].maps[0].shape[1])]
    fig, axes = plt.subplots(depth, len(cols), figsize=(1.55 * len(cols) + 0.6, 1.5 * depth + 0.6), squeeze=False)
    for c, (name, h) in enumerate(cols):
        rec = named[name]
        for row, b in enumerate(shown):
            ax = axes[row, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if b >= len(rec.maps):
                ax.axis("off")
                continue
            att = rec.maps[b][image_index, h].float().cpu()
            lim = float(att.abs().max()) or 1.0
            if float(att.min()) >= 0:  # softmax: weights in [0, lim]
                ax.imshow(att, cmap="viridis", vmin=0, vmax=lim, interpolation="nearest")
            else:
                ax.imshow(att, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            kind = "KArAt" if h < rec.karat_heads[b] else "softmax"
            ax.text(0.02, 0.98, f"{lim:.2g}", transform=ax.transAxes, fontsize=6, va="top")
            if row == 0:
                ax.set_title(f"{name}\nhead {h} ({kind})", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"block {b}", fontsize=7)
    fig.suptitle("attention matrices on one image (rows: queries, columns: keys). Signed maps: red > 0 > blue; "
                 "non-negative maps: viridis from 0. Corner: the colour limit", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (1.5 * depth + 0.6)))
    fig.savefig(path, dpi=70)
    plt.close(fig)


def plot_rollout(named: Dict[str, AttentionRecord], image: torch.Tensor, grid: Tuple[int, int],
                 prefix: Dict[str, int], path: str) -> Dict[str, List[List[float]]]:
    """The image, then per model the rollout over all blocks as the weight each patch gets (the class token's
    row when the model has one, else the mean over queries). Returns the plotted maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(named) + 1, figsize=(3.0 * (len(named) + 1), 3.0), squeeze=False)
    img = image.float().cpu()
    img = img[0] if img.shape[0] == 1 else ((img - img.min()) / (img.max() - img.min() + 1e-12)).permute(1, 2, 0)
    axes[0, 0].imshow(img, cmap="gray")
    axes[0, 0].set_title("input", fontsize=9)
    out = {}
    for i, (name, rec) in enumerate(named.items(), start=1):
        roll = attention_rollout([m[:1] for m in rec.maps])[0]
        received = roll[0] if prefix[name] else roll.mean(0)
        patch = _patch_map(received, grid).cpu()
        out[name] = patch.tolist()
        im = axes[0, i].imshow(patch, cmap="magma")
        fig.colorbar(im, ax=axes[0, i], fraction=0.046, pad=0.04)
        axes[0, i].set_title(f"{name}: rollout over {len(rec.maps)} blocks", fontsize=9)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return out
