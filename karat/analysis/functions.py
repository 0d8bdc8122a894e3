"""The learned univariate functions of KArAt: every edge ``phi_qp(x) = w_b b(x) + w_s f_qp(x)`` of every KAN layer,
evaluated over the range of inputs the images actually produce (for ``phi1_w2`` these are the attention logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from ..bases import PerEdgeBasis, SharedFeatureBasis
from ..kan import KANLayer
from ..operator import KArAtOperator


def kan_layers(model: nn.Module) -> List[Tuple[int, str, KANLayer]]:
    """``(block, layer name inside the operator, layer)`` for every KAN layer of every block's operator."""
    out = []
    for i, block in enumerate(model.blocks):
        core = getattr(block.attn, "karat", None)
        if core is None:
            continue
        for name, mod in core.operator.named_modules():
            if isinstance(mod, KANLayer):
                out.append((i, name, mod))
    return out


@torch.no_grad()
def edge_functions(layer: KANLayer, xs: torch.Tensor) -> torch.Tensor:
    """Values of every edge function at the points ``xs`` ``(T,)``: ``(heads, in, out, T)``."""
    basis = layer.basis
    xs = xs.to(layer.basis_scale.dtype)
    if isinstance(basis, SharedFeatureBasis):
        coef = basis.coefficients * layer.basis_scale.unsqueeze(-1)
        values = torch.einsum("tm,hiom->hiot", basis.features(xs), coef)
    elif isinstance(basis, PerEdgeBasis):
        x = xs.view(1, 1, -1, 1).expand(1, layer.num_heads, xs.numel(), layer.in_features)
        values = (basis.edge_values(x)[0] * layer.basis_scale.unsqueeze(1)).permute(0, 2, 3, 1)
    else:  # pragma: no cover - every basis is one of the two families
        raise TypeError(f"Unknown basis {type(basis).__name__}")
    if layer.has_base:
        values = values + layer.base_weight.unsqueeze(-1) * layer.base_fn(xs)
    return values


@dataclass
class LayerInputs:
    """A sample of the values a KAN layer received, per head (at most ``max_values`` each)."""

    values: List[torch.Tensor]


@torch.no_grad()
def record_layer_inputs(model: nn.Module, images: torch.Tensor, max_values: int = 200_000) -> Dict[Tuple[int, str],
                                                                                                  LayerInputs]:
    """Run the model once and keep, per KAN layer and head, a sample of that layer's inputs."""
    found: Dict[Tuple[int, str], LayerInputs] = {}
    hooks = []
    layers = kan_layers(model)
    gen = torch.Generator().manual_seed(0)
    for block, name, layer in layers:
        def pre_hook(mod, args, _key=(block, name)):
            x = args[0].detach().transpose(0, 1).reshape(mod.num_heads, -1)  # (H, everything)
            if x.shape[1] > max_values:
                x = x[:, torch.randperm(x.shape[1], generator=gen)[:max_values]]
            found[_key] = LayerInputs(list(x.float().cpu()))
        hooks.append(layer.register_forward_pre_hook(pre_hook))
    was_training = model.training
    model.eval()
    try:
        # The efficient paths call the layers block by block; the reference path shows each layer all its inputs.
        cores = [blk.attn.karat for blk in model.blocks if hasattr(blk.attn, "karat")]
        saved = [c.export_attention for c in cores]
        for c in cores:
            c.export_attention = True
        model(images)
    finally:
        for h in hooks:
            h.remove()
        for c, s in zip(cores, saved):
            c.export_attention, c.last_attention = s, None
        model.train(was_training)
    return found


def summarise_functions(model: nn.Module, images: torch.Tensor, points: int = 96, bins: int = 40,
                        quantile: float = 0.005, max_curves: int = 24) -> List[Dict[str, Any]]:
    """Per block, KAN layer and head: the input range the images produce (``quantile`` trimmed), its histogram,
    and the edge functions over it (mean, standard deviation over edges, and the ``max_curves`` most varied)."""
    inputs = record_layer_inputs(model, images)
    rows = []
    for block, name, layer in kan_layers(model):
        for head, sample in enumerate(inputs[(block, name)].values):
            lo, hi = torch.quantile(sample[:1_000_000], torch.tensor([quantile, 1 - quantile])).tolist()
            if hi - lo < 1e-6:
                lo, hi = lo - 0.5, hi + 0.5
            counts, edges = torch.histogram(sample.clamp(lo, hi), bins=bins, range=(lo, hi))
            xs = torch.linspace(lo, hi, points)
            curves = edge_functions(layer, xs)[head].reshape(-1, points).float().cpu()
            order = curves.std(dim=1).argsort(descending=True)[:max_curves]
            rows.append(dict(block=block, layer=name or "operator", head=head, range=[lo, hi],
                             observed=[float(sample.min()), float(sample.max())], x=xs.tolist(),
                             mean=curves.mean(0).tolist(), std=curves.std(0).tolist(),
                             curves=curves[order].tolist(), num_edges=int(curves.shape[0]),
                             hist_counts=counts.tolist(), hist_edges=edges.tolist()))
    return rows


def plot_functions(rows: List[Dict[str, Any]], path: str, title: str = "") -> None:
    """One cell per block/layer (rows) and head (columns): the edge functions with ``exp`` for reference above,
    the histogram of the inputs the images produce below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["block"], r["layer"]) for r in rows})
    heads = 1 + max(r["head"] for r in rows)
    height = 2.5 * len(keys) + 0.8
    fig = plt.figure(figsize=(3.4 * heads, height))
    outer = fig.add_gridspec(len(keys), heads, hspace=0.55, wspace=0.45, top=1 - 0.8 / height, bottom=0.3 / height)
    for r in rows:
        cell = outer[keys.index((r["block"], r["layer"])), r["head"]].subgridspec(2, 1, height_ratios=[3, 1], hspace=0)
        ax, axh = fig.add_subplot(cell[0]), fig.add_subplot(cell[1])
        x = r["x"]
        for c in r["curves"]:
            ax.plot(x, c, color="tab:blue", alpha=0.18, lw=0.7)
        mean, std = torch.tensor(r["mean"]), torch.tensor(r["std"])
        ax.fill_between(x, mean - std, mean + std, color="tab:blue", alpha=0.15, lw=0)
        ax.plot(x, r["mean"], color="tab:blue", lw=1.6, label="phi (mean over edges)")
        ax2 = ax.twinx()
        ax2.plot(x, torch.tensor(x).exp().tolist(), color="tab:red", ls="--", lw=1.0, label="exp")
        ax2.tick_params(labelsize=6, colors="tab:red")
        ax.tick_params(labelsize=6, labelbottom=False)
        layer = "" if r["layer"] in ("phi", "operator") else f" {r['layer']}"
        ax.set_title(f"block {r['block']}{layer}, head {r['head']}", fontsize=8)
        centres = [(a + b) / 2 for a, b in zip(r["hist_edges"][:-1], r["hist_edges"][1:])]
        axh.bar(centres, r["hist_counts"], width=r["hist_edges"][1] - r["hist_edges"][0], color="gray")
        axh.set_yticks([])
        axh.tick_params(labelsize=6)
        axh.set_xlim(x[0], x[-1])
        ax.set_xlim(x[0], x[-1])
    handles = [plt.Line2D([], [], color="tab:blue", lw=1.6), plt.Line2D([], [], color="tab:red", ls="--"),
               plt.Rectangle((0, 0), 1, 1, color="gray")]
    fig.legend(handles, ["learned phi: mean over edges (band: +-1 std; thin: most varied edges)",
                         "exp, softmax's function (right axis)", "inputs the images produce"],
               loc="upper center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1 - 0.3 / height))
    fig.suptitle(title or "KArAt's learned univariate functions", fontsize=10, y=1 - 0.05 / height)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
