"""Weight distributions: KArAt's coefficients (grouped by what they are) and the attention projections (qkv, proj)
that both KArAt and softmax models have, so the two can be compared."""
from __future__ import annotations

import re
from typing import Any, Dict, List

import torch
import torch.nn as nn

from ..attention import is_karat_key


def weight_groups(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Flattened weights per group: ``qkv``, ``proj`` (all blocks) and, for KArAt, one group per operator tensor
    kind (``coefficients``, ``basis_scale``, ``weight``, ``base_weight`` where a base function uses it, ...).
    Shared operators count once."""
    from ..kan import KANLayer

    unused = {id(m.base_weight) for m in model.modules() if isinstance(m, KANLayer) and not m.has_base}
    groups: Dict[str, List[torch.Tensor]] = {}
    for name, p in model.named_parameters():  # named_parameters drops duplicates (universal sharing)
        if id(p) in unused:  # w_b of a layer without base function (ZeroModule): never used
            continue
        if is_karat_key(name):
            key = "karat " + name.split(".")[-1]
        elif re.search(r"\.attn\.qkv\.weight$", name):
            key = "qkv"
        elif re.search(r"\.attn\.proj\.weight$", name):
            key = "proj"
        else:
            continue
        groups.setdefault(key, []).append(p.detach().flatten().float().cpu())
    return {k: torch.cat(v) for k, v in groups.items()}


def describe(values: torch.Tensor, bins: int = 60) -> Dict[str, Any]:
    """Moments, quantiles and a histogram of a flat tensor."""
    v = values.double()
    mean, std = v.mean(), v.std()
    z = (v - mean) / std.clamp_min(1e-300)
    q = torch.quantile(v[:1_000_000], torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)).tolist()
    counts, edges = torch.histogram(values, bins=bins)
    return dict(count=int(v.numel()), mean=float(mean), std=float(std), min=float(v.min()), max=float(v.max()),
                abs_mean=float(v.abs().mean()), kurtosis=float((z ** 4).mean()), q01=q[0], median=q[1], q99=q[2],
                hist_counts=counts.tolist(), hist_edges=edges.tolist())


def weight_summary(named: Dict[str, nn.Module]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    return {name: {g: describe(v) for g, v in weight_groups(m).items()} for name, m in named.items()}


def plot_weights(named: Dict[str, nn.Module], path: str) -> None:
    """One panel per group: the histogram of each model that has it (qkv and proj: KArAt against softmax)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {name: weight_groups(m) for name, m in named.items()}
    keys = ["qkv", "proj"] + sorted({k for g in groups.values() for k in g if k.startswith("karat")})
    cols = min(len(keys), 3)
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows + 0.4), squeeze=False)
    colours = {"KArAt": "tab:blue", "softmax": "tab:orange"}
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        have = {n: g[key] for n, g in groups.items() if key in g}
        lo = min(float(torch.quantile(v[:1_000_000], 0.001)) for v in have.values())
        hi = max(float(torch.quantile(v[:1_000_000], 0.999)) for v in have.values())
        if hi - lo < 1e-6:  # a constant tensor (e.g. an untrained basis_scale of ones)
            lo, hi = lo - 0.5, hi + 0.5
        for n, v in have.items():
            ax.hist(v.clamp(lo, hi).numpy(), bins=60, range=(lo, hi), density=True, histtype="stepfilled",
                    alpha=0.45, color=colours.get(n), label=f"{n} (std {float(v.std()):.3g})")
        ax.set(title=key, yscale="log")
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("weight distributions (density, log scale; 0.1%-99.9% range)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
