"""Attention maps of a timm ViT, softmax or KArAt, and a figure that puts them side by side.

For KArAt blocks the map is the operator's ``sigma(S)`` (exported through the reference path); for softmax
blocks it is ``softmax(q k^T / sqrt(d))``, recomputed from the block's input by a forward hook (timm's
attention uses fused SDPA and never forms it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from karat import KArAtAttention


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """Per block, a ``(B, H, N, N)`` tensor of attention weights (KArAt heads only for mixed-head blocks)."""
    maps: Dict[int, torch.Tensor] = {}
    hooks = []
    karat_cores = []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if isinstance(attn, KArAtAttention):
            attn.karat.export_attention = True
            karat_cores.append((i, attn.karat))
        else:
            def hook(mod, args, _out, _i=i):
                x = args[0]
                b, n, _ = x.shape
                qkv = mod.qkv(x).reshape(b, n, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
                q, k = mod.q_norm(qkv[0]), mod.k_norm(qkv[1])
                maps[_i] = ((q * mod.scale) @ k.transpose(-2, -1)).softmax(-1)
            hooks.append(attn.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(images)
        for i, core in karat_cores:
            maps[i] = core.last_attention
    finally:
        for h in hooks:
            h.remove()
        for _, core in karat_cores:
            core.export_attention, core.last_attention = False, None
        model.train(was_training)
    return [maps[i] for i in sorted(maps)]


def plot_attention(named_maps: Dict[str, List[torch.Tensor]], image: torch.Tensor, grid: Sequence[int],
                   path: Path, block: int = -1) -> None:
    """One row per model: the input, then per head of ``block`` the mean weight each patch receives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = max(m[block].shape[1] for m in named_maps.values())
    fig, axes = plt.subplots(len(named_maps), heads + 1, figsize=(2.2 * (heads + 1), 2.3 * len(named_maps)),
                             squeeze=False)
    for row, (name, maps) in enumerate(named_maps.items()):
        axes[row, 0].imshow(image.squeeze().cpu(), cmap="gray")
        axes[row, 0].set_title(f"{name}: input", fontsize=9)
        att = maps[block][0]  # (H, N, N), first image
        received = att.mean(dim=1)  # mean over queries: how much each key is used
        for h in range(heads):
            ax = axes[row, h + 1]
            if h < received.shape[0]:
                patch = received[h, -grid[0] * grid[1]:].reshape(*grid).cpu()
                lim = float(patch.abs().max()) or 1.0
                im = ax.imshow(patch, cmap="RdBu_r", vmin=-lim, vmax=lim)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
                ax.set_title(f"block {block % len(maps)}, head {h}", fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("mean attention weight each patch receives (KArAt weights may be negative)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
