"""The optimizer's path: PCA of a run's saved checkpoints (Li et al., 2018, section 7) around the final weights, and
the loss over the plane of the two main components with the trajectory drawn on it.

``classification.main --keep-every K`` saves ``checkpoint-epochNNN.pth`` every K epochs for this.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..checkpoint import load_checkpoint
from .landscape import Direction, parameters

EPOCH_FILE = re.compile(r"checkpoint-epoch(\d+)\.pth$")


def find_trajectory(checkpoint: Path) -> List[Path]:
    """The ``checkpoint-epochNNN.pth`` files beside ``checkpoint``, in epoch order."""
    found = [p for p in Path(checkpoint).parent.iterdir() if EPOCH_FILE.search(p.name)]
    return sorted(found, key=lambda p: int(EPOCH_FILE.search(p.name).group(1)))


def load_states(paths: Sequence[Path], model: nn.Module) -> List[Dict[str, torch.Tensor]]:
    """The model's parameters from every checkpoint; a checkpoint of another model is refused clearly."""
    names = parameters(model)
    out = []
    for p in paths:
        ckpt = load_checkpoint(p)
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}
        missing = [n for n in names if n not in state or state[n].shape != names[n].shape]
        if missing:
            raise ValueError(f"{p} is not a checkpoint of the analysed model (it lacks or reshapes {missing[:3]}); "
                             f"the trajectory must come from the same run.")
        out.append({n: state[n].float() for n in names})
    return out


def flatten(state: Dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[n].flatten().double() for n in names])


def pca(points: torch.Tensor, centre: torch.Tensor, k: int = 2) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of ``points`` ``(T, P)`` relative to ``centre``: (components ``(k, P)``, coordinates ``(T, k)``,
    explained-variance ratios of all components). Fewer than ``k`` points give zero components."""
    m = (points - centre).double()
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    comps = torch.zeros(k, m.shape[1], dtype=m.dtype)
    comps[: min(k, vh.shape[0])] = vh[:k]
    var = s ** 2
    return comps, m @ comps.T, var / var.sum().clamp_min(1e-300)


def unflatten(vector: torch.Tensor, like: Dict[str, nn.Parameter]) -> Direction:
    out, i = {}, 0
    for n, p in like.items():
        out[n] = vector[i:i + p.numel()].view_as(p).to(p.dtype)
        i += p.numel()
    return out


def trajectory_plane(model: nn.Module, states: List[Dict[str, torch.Tensor]]) -> Dict:
    """PCA of ``states`` around the model's current (final) weights: the two directions and the coordinates."""
    params = parameters(model)
    names = list(params)
    centre = torch.cat([p.detach().flatten().double() for p in params.values()])
    points = torch.stack([flatten(s, names) for s in states])
    comps, coords, ratio = pca(points, centre)
    return dict(d1=unflatten(comps[0], params), d2=unflatten(comps[1], params), coords=coords.tolist(),
                explained=ratio.tolist())


def axis_range(values: Sequence[float], points: int, margin: float = 0.25) -> List[float]:
    """``points`` values covering ``values`` and 0 with a margin, including 0 exactly (the final weights)."""
    lo, hi = min(list(values) + [0.0]), max(list(values) + [0.0])
    span = max(hi - lo, 1e-3)
    lo, hi = lo - margin * span, hi + margin * span
    half = points // 2
    neg = [lo * (half - i) / half for i in range(half)]
    pos = [hi * i / (points - 1 - half) for i in range(1, points - half)]
    return neg + [0.0] + pos


def plot_paths(results: Dict[str, Dict], path: str) -> None:
    """Per model: log loss over the PCA plane, the trajectory (epochs labelled) ending at the final weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.8 * len(results), 4.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        z = torch.tensor(r["loss"]).log10().numpy()
        cs = ax.contourf(r["xs"], r["ys"], z, levels=20, cmap="viridis")
        ax.contour(r["xs"], r["ys"], z, levels=10, colors="white", linewidths=0.4)
        fig.colorbar(cs, ax=ax, fraction=0.046, pad=0.04, label="log10 loss")
        xy = r["coords"] + [[0.0, 0.0]]
        ax.plot([p[0] for p in xy], [p[1] for p in xy], color="red", marker="o", ms=4, lw=1.2)
        for (x, y), e in zip(r["coords"], r["epochs"]):
            ax.annotate(str(e), (x, y), fontsize=7, color="white", xytext=(3, 3), textcoords="offset points")
        ax.plot([0], [0], marker="*", color="red", ms=12)
        ev = r["explained"] + [0.0, 0.0]
        ax.set(title=f"{name}: optimizer path (epochs)", xlabel=f"PC1 ({100 * ev[0]:.0f}% of variance)",
               ylabel=f"PC2 ({100 * ev[1]:.0f}%)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
