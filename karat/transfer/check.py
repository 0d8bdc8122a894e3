"""The one check of a checkpoint against a model, and the one report of what a transfer did.

Every host loads non-strictly (KArAt tensors are new when a softmax checkpoint starts a KArAt model), so this
check is what makes a checkpoint of another architecture fail loudly, naming what differs (width, patch size,
depth, MLP width, token count) and the fix, instead of a deep torch shape error or a silent partial load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..attention import is_karat_key
from ..params import drop_unused_base_weights
from .renames import rename_state

# How each host's constructor names the dimensions the architecture check compares.
ARCH_LABELS: Dict[str, Dict[str, str]] = {
    "timm": dict(width="width (embed_dim)", patch="patch size", depth="depth", mlp="MLP width"),
    "detectron2": dict(width="width (embed_dim)", patch="patch size", depth="depth", mlp="MLP width"),
    "mmseg": dict(width="width (embed_dims)", patch="patch size", depth="depth (num_layers)", mlp="MLP width"),
}


@dataclass
class TransferReport:
    """What fitting a checkpoint to a model did, printed for the user (and read by tests)."""

    loaded: List[str] = field(default_factory=list)
    resampled: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)  # in the model, not in the checkpoint (initialised by the model)
    dropped: List[str] = field(default_factory=list)  # in the checkpoint, not taken (classifier head, ...)
    notes: List[str] = field(default_factory=list)

    @property
    def missing_non_karat(self) -> List[str]:
        return [k for k in self.new if not is_karat_key(k)]

    def __str__(self) -> str:
        def sample(names: Sequence[str]) -> str:
            return "" if not names else f" (e.g. {', '.join(names[:3])})"

        karat_only = " -- KArAt operator tensors only" if self.new and not self.missing_non_karat else ""
        return "\n".join([
            f"loaded as is:        {len(self.loaded)} tensors",
            f"resampled:           {len(self.resampled)} tensors{sample(self.resampled)}",
            f"newly initialised:   {len(self.new)} tensors{sample(self.new)}{karat_only}",
            f"dropped from source: {len(self.dropped)} tensors{sample(self.dropped)}",
        ] + [f"note: {n}" for n in self.notes])


def architecture(state: Mapping[str, torch.Tensor], host: str = "timm") -> Dict[str, Any]:
    """Width, patch size, depth and MLP width of a ViT state dict in ``host``'s names (what is there to read)."""
    timm_names = state if host == "timm" else rename_state(state, host, inverse=True, strict=False)[0]
    labels = ARCH_LABELS.get(host, ARCH_LABELS["timm"])
    arch: Dict[str, Any] = {}
    proj = timm_names.get("patch_embed.proj.weight")
    if proj is not None:
        arch[labels["width"]] = int(proj.shape[0])
        arch[labels["patch"]] = tuple(int(v) for v in proj.shape[2:])
    elif "pos_embed" in timm_names:
        arch[labels["width"]] = int(timm_names["pos_embed"].shape[-1])
    blocks = {int(m.group(1)) for k in timm_names if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        arch[labels["depth"]] = max(blocks) + 1
    fc1 = timm_names.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        arch[labels["mlp"]] = int(fc1.shape[0])
    return arch


def check_architecture(model_state: Mapping[str, torch.Tensor], ckpt_state: Mapping[str, torch.Tensor],
                       host: str = "timm", fix: str = "") -> None:
    """Raise ``ValueError`` naming width, patch size, depth or MLP width where the checkpoint's differ from the
    model's. Run it before resampling: a width mismatch would otherwise surface as a token-count error."""
    have, want = architecture(ckpt_state, host), architecture(model_state, host)
    diff = [f"{k} {have[k]} vs the model's {want[k]}" for k in want if k in have and have[k] != want[k]]
    if diff:
        raise ValueError(f"The checkpoint's tensors do not fit this ViT, it is for another architecture: "
                         f"{'; '.join(diff)}. {fix}".rstrip())


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, key) for p in patterns)


def _why(key: str) -> str:
    if key == "pos_embed" or key.endswith(".pos_embed"):
        return "token count (image size / patch size)"
    if is_karat_key(key):
        return "KArAt operators' token count or options (grid, hidden_dim, heads, ...)"
    return "heads, window size or other options"


def check_state(model: Union[nn.Module, Mapping[str, torch.Tensor]], state: Mapping[str, torch.Tensor], *,
                host: str = "timm", report: Optional[TransferReport] = None, resampled: Iterable[str] = (),
                dropped: Iterable[str] = (), drop: Sequence[str] = (), ignore: Sequence[str] = (),
                allow_new: Sequence[str] = (), may_differ: Sequence[str] = (), fix: str = "") -> TransferReport:
    """Check checkpoint tensors ``state`` (the host's names, already renamed and resampled) against ``model``.

    Errors: the architecture differs (``check_architecture``); the checkpoint has tensors the model has not;
    a shape differs (unless a ``may_differ`` pattern matches, e.g. a classifier head the host re-initialises);
    the model has tensors the checkpoint lacks other than KArAt ones and ``allow_new`` patterns. Patterns are
    regular expressions searched in the key. ``drop``: checkpoint tensors the model has no place for that are
    quietly dropped (a classifier's head); ``ignore``: keys left out of the comparison both ways (buffers the
    model computes). ``fix`` ends every message: what the user should do. With a module for ``model``, KArAt
    base weights of checkpoints from before the zero base are dropped too. Returns ``report`` completed."""
    report = report if report is not None else TransferReport()
    report.dropped.extend(k for k in dropped if k not in report.dropped)
    report.resampled.extend(k for k in resampled if k in state and k not in report.resampled)
    name = type(model).__name__ if isinstance(model, nn.Module) else "the model"
    unused_base: List[str] = []
    if isinstance(model, nn.Module):
        _, unused_base = drop_unused_base_weights(state, model)
        report.dropped.extend(unused_base)
        model = model.state_dict()
    expected = model
    check_architecture(expected, state, host, fix)
    unknown = [k for k in state if k not in expected and k not in unused_base and not _matches(k, ignore)]
    quiet = [k for k in unknown if _matches(k, drop)]
    report.dropped.extend(quiet)
    unknown = [k for k in unknown if k not in quiet]
    if unknown:
        raise ValueError(f"The checkpoint has {len(unknown)} tensors that {name} does not have (e.g. {unknown[:3]}): "
                         f"it is for another architecture. {fix}".rstrip())
    wrong = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape
             and not _matches(k, may_differ)]
    if wrong:
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:3]]
        why = "; ".join(dict.fromkeys(_why(k) for k in wrong))
        raise ValueError(f"{len(wrong)} tensors of the checkpoint do not fit {name}, wrong shape ({shapes}). What "
                         f"differs from the model's config: {why}. {fix}".rstrip())
    taken = set(report.resampled) | set(quiet)
    report.loaded = [k for k in state if k in expected and k not in taken]
    report.new = [k for k in expected if k not in state and not _matches(k, ignore)]
    bad = [k for k in report.new if not is_karat_key(k) and not _matches(k, allow_new)]
    if bad:
        raise ValueError(f"The checkpoint lacks {len(bad)} non-KArAt tensors of {name} (e.g. {bad[:3]}): it is for "
                         f"another architecture (or not a backbone checkpoint). Only KArAt operator tensors may be "
                         f"missing (a softmax checkpoint starts a KArAt model). {fix}".rstrip())
    return report


def check_transfer(converted: Mapping[str, torch.Tensor], target: nn.Module, resampled: Iterable[str] = (),
                   dropped: Iterable[str] = ()) -> TransferReport:
    """``check_state`` with every missing tensor allowed (reported as new); kept for existing callers."""
    return check_state(target.state_dict(), converted, resampled=resampled, dropped=dropped, allow_new=("",))
