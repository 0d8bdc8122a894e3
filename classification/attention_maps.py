"""The demo's attention-map figure; the maps themselves come from ``karat.analysis`` (softmax and KArAt heads,
rollout and the rest of the analyses live there, see ``python -m tools.analyze``)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch

from karat.analysis.attention import attention_maps

__all__ = ["attention_maps", "plot_attention"]


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
