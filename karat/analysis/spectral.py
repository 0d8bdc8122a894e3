"""Spectral behaviour of attention matrices: singular values, effective rank, row entropy and row sums.

softmax rows lie on the probability simplex; KArAt's ``sigma(S)`` rows need not (they may be negative and do not
sum to one), so the distance of each row from the simplex is measured too.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from ..simplex import project_to_simplex


def singular_values(maps: torch.Tensor) -> torch.Tensor:
    """Singular values of every ``(N, N)`` matrix of ``maps`` ``(..., N, N)``, descending, in float64."""
    return torch.linalg.svdvals(maps.double())


def numerical_rank(sv: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """How many singular values exceed ``rtol`` times the largest (per matrix)."""
    return (sv > rtol * sv[..., :1]).sum(-1)


def effective_rank(sv: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli (2007): ``exp`` of the entropy of the normalised singular values (between 1 and N)."""
    p = sv / sv.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum(-1))


def row_entropy(maps: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of every row, taken as a distribution ``|w| / sum |w|`` (``log N`` when uniform)."""
    a = maps.double().abs()
    p = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def simplex_distance(maps: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every row from the probability simplex (0 for softmax rows)."""
    m = maps.double()
    return (m - project_to_simplex(m)).norm(dim=-1)


def spectral_summary(maps: List[torch.Tensor], karat_heads: Optional[List[int]] = None) -> List[Dict[str, Any]]:
    """Per block: mean normalised singular-value curve (over images and heads), effective and numerical rank,
    row entropy, row sums and distance from the simplex, as plain numbers."""
    out = []
    for i, m in enumerate(maps):
        sv = singular_values(m)  # (B, H, N)
        n = m.shape[-1]
        sums = m.double().sum(-1)
        out.append(dict(
            block=i, tokens=n, karat_heads=(karat_heads or [0] * len(maps))[i],
            singular_values=(sv / sv[..., :1].clamp_min(1e-300)).mean((0, 1)).tolist(),
            singular_values_raw=sv.mean((0, 1)).tolist(),
            effective_rank=float(effective_rank(sv).mean()),
            effective_rank_per_head=effective_rank(sv).mean(0).tolist(),
            numerical_rank=float(numerical_rank(sv).double().mean()),
            row_entropy=float(row_entropy(m).mean()), max_entropy=math.log(n),
            row_sum_mean=float(sums.mean()), row_sum_std=float(sums.std()),
            row_sum_hist=torch.histogram(sums.flatten().float().cpu(), bins=30).hist.tolist(),
            row_sum_range=[float(sums.min()), float(sums.max())],
            negative_fraction=float((m < 0).double().mean()),
            simplex_distance=float(simplex_distance(m).mean())))
    return out


def plot_spectra(named: Dict[str, List[Dict[str, Any]]], path: str) -> None:
    """Singular-value curves per block for each model, then effective rank, row entropy, row sums and distance
    from the simplex per block, models side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(named)
    fig, axes = plt.subplots(2, max(len(names), 2) + 1, figsize=(4.2 * (max(len(names), 2) + 1), 7.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    colours = {"KArAt": "tab:blue", "softmax": "tab:orange"}
    for col, name in enumerate(names):
        ax = axes[0, col]
        rows = named[name]
        for r in rows:
            ax.semilogy(range(1, len(r["singular_values"]) + 1), r["singular_values"],
                        color=cmap(r["block"] / max(len(rows) - 1, 1)), lw=1.2, label=f"block {r['block']}")
        ax.set(title=f"{name}: singular values / largest", xlabel="index", ylim=(1e-4, 1.5))
        ax.grid(alpha=0.3)
        if len(rows) <= 12:
            ax.legend(fontsize=6, ncol=2)
    for c in range(len(names), max(len(names), 2)):
        axes[0, c].axis("off")
    panels = [(axes[0, -1], "effective_rank", "effective rank (Roy & Vetterli)"),
              (axes[1, 0], "row_entropy", "row entropy of |w| / sum|w| (nats)"),
              (axes[1, 1], "simplex_distance", "row distance from the simplex")]
    for ax, key, title in panels:
        for name in names:
            blocks = [r["block"] for r in named[name]]
            ax.plot(blocks, [r[key] for r in named[name]], marker="o", color=colours.get(name), label=name)
        if key == "row_entropy":
            ax.axhline(named[names[0]][0]["max_entropy"], color="gray", ls=":", label="log N (uniform)")
        ax.set(title=title, xlabel="block")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[1, -1]
    for name in names:
        blocks = [r["block"] for r in named[name]]
        mean = torch.tensor([r["row_sum_mean"] for r in named[name]])
        std = torch.tensor([r["row_sum_std"] for r in named[name]])
        ax.errorbar(blocks, mean.tolist(), yerr=std.tolist(), marker="o", capsize=2, color=colours.get(name),
                    label=name)
    ax.axhline(1.0, color="gray", ls=":", label="1 (softmax)")
    ax.set(title="row sums (mean +- std)", xlabel="block")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for extra in axes[1, 2:-1]:
        extra.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
