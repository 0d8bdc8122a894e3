"""Loss landscapes around a checkpoint (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets").

Random directions are filter-normalised: every filter (slice along the first axis) of a direction gets the norm of
the same filter of the weights, so landscapes of differently scaled networks are comparable; 1-D parameters (biases,
norms) are not perturbed, as in the paper. The loss is the mean cross-entropy over a fixed held-out batch set; the
cost is (points) x (batches) forward passes, shown by a progress bar.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..progress import on_terminal

Direction = Dict[str, torch.Tensor]
Batches = Sequence[Tuple[torch.Tensor, torch.Tensor]]


def parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Floating-point parameters by name (a shared KArAt operator once)."""
    return {n: p for n, p in model.named_parameters() if p.is_floating_point()}


def filter_normalised_direction(model: nn.Module, generator: Optional[torch.Generator] = None) -> Direction:
    """A Gaussian direction with every filter scaled to the norm of the weights' filter (1-D tensors: zero)."""
    out = {}
    for name, p in parameters(model).items():
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p)
        if p.dim() <= 1:
            d.zero_()
        else:
            w = p.detach().flatten(1).norm(dim=1)
            dn = d.flatten(1).norm(dim=1).clamp_min(1e-12)
            d = (d.flatten(1) * (w / dn).unsqueeze(1)).view_as(p)
        out[name] = d
    return out


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Batches) -> float:
    """Mean cross-entropy of ``model`` (eval mode) over every image of ``batches``."""
    total, count = 0.0, 0
    for x, y in batches:
        total += float(F.cross_entropy(model(x), y, reduction="sum"))
        count += len(y)
    return total / max(count, 1)


@contextmanager
def perturbed(model: nn.Module) -> Iterator["callable"]:
    """Yield ``move(coefficients, directions)`` that sets the weights to ``theta + sum c_i d_i``; the checkpoint's
    weights and the model's mode are restored on exit."""
    params = parameters(model)
    base = {n: p.detach().clone() for n, p in params.items()}
    was_training = model.training
    model.eval()

    def move(coefficients: Sequence[float], directions: Sequence[Direction]) -> None:
        with torch.no_grad():
            for n, p in params.items():
                value = base[n].clone()
                for c, d in zip(coefficients, directions):
                    if c:
                        value.add_(d[n], alpha=float(c))
                p.copy_(value)

    try:
        yield move
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(base[n])
        model.train(was_training)


def _progress(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not (show and on_terminal()), leave=False)  # log files: no bar


def landscape_1d(model: nn.Module, batches: Batches, direction: Direction, alphas: Sequence[float],
                 desc: str = "1-D landscape", progress: bool = True) -> List[float]:
    """Loss at ``theta + alpha d`` for every alpha."""
    out = []
    with perturbed(model) as move, _progress(len(alphas), desc, progress) as bar:
        for a in alphas:
            move([a], [direction])
            out.append(mean_loss(model, batches))
            bar.update()
    return out


def landscape_2d(model: nn.Module, batches: Batches, d1: Direction, d2: Direction, xs: Sequence[float],
                 ys: Sequence[float], desc: str = "2-D landscape", progress: bool = True) -> List[List[float]]:
    """Loss at ``theta + x d1 + y d2`` on the grid; ``out[j][i]`` is at ``(xs[i], ys[j])``."""
    out = []
    with perturbed(model) as move, _progress(len(xs) * len(ys), desc, progress) as bar:
        for y in ys:
            row = []
            for x in xs:
                move([x, y], [d1, d2])
                row.append(mean_loss(model, batches))
                bar.update()
            out.append(row)
    return out


def symmetric_grid(points: int, span: float) -> List[float]:
    """``points`` values evenly over ``[-span, span]``, always including 0 exactly (the checkpoint itself)."""
    if points < 3 or points % 2 == 0:
        raise ValueError(f"A landscape grid needs an odd number >= 3 of points (got {points}) so that its centre "
                         f"is the checkpoint itself.")
    half = points // 2
    return [span * i / half for i in range(-half, half + 1)]


def plot_landscapes(results: Dict[str, Dict], path: str) -> None:
    """1-D curves of all models in one panel, then each model's 2-D landscape as filled contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results) + 1, figsize=(4.3 * (len(results) + 1), 3.8), squeeze=False)
    colours = {"KArAt": "tab:blue", "softmax": "tab:orange"}
    for name, r in results.items():
        axes[0, 0].plot(r["alphas"], r["loss_1d"], marker=".", color=colours.get(name), label=name)
    axes[0, 0].set(title="1-D, filter-normalised direction", xlabel="alpha", ylabel="loss")
    axes[0, 0].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    for ax, (name, r) in zip(axes[0, 1:], results.items()):
        z = torch.tensor(r["loss_2d"]).log10()
        cs = ax.contourf(r["xs"], r["ys"], z.numpy(), levels=20, cmap="viridis")
        ax.contour(r["xs"], r["ys"], z.numpy(), levels=10, colors="white", linewidths=0.4)
        ax.plot([0], [0], marker="*", color="red", ms=10)
        fig.colorbar(cs, ax=ax, fraction=0.046, pad=0.04, label="log10 loss")
        ax.set(title=f"{name}: 2-D (centre loss {r['centre_loss']:.3f})", xlabel="d1", ylabel="d2")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
