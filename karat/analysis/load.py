"""Any of our checkpoints as a timm ViT, so one analysis code path serves every host.

* classification (``classification.main`` / the demo): ``model``, ``model_name``, ``model_kwargs``; rebuilt as is;
* detectron2 ViTDet backbone (``backbone.net.*``: a converted ``backbone_init.pth`` or a trained ``model_final.pth``);
* mmseg / mmdet ViT backbone (``backbone.layers.*`` or bare ``layers.*``: a converted checkpoint or a runner's).

Host names are mapped back to timm's with ``karat.transfer.RENAMES`` read backwards (the converters' tables). A backbone
has no classifier, so its timm ViT has none either (``num_classes=0``). Two approximations are reported in
``notes``: ViTDet's relative-position bias is dropped, and every block becomes a global attention over the whole
patch grid (window operators are resampled to it, spec section 6). KArAt options come from the checkpoint's
metadata, a ``config.yaml`` beside a detectron2 checkpoint, or the tensors themselves; ``karat_options`` override.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..attention import is_karat_key
from ..checkpoint import load_checkpoint
from ..config import KArAtConfig, host_kwargs, pop_config
from ..resample import TokenLayout, resample_operator_state
from ..transfer import fit_pos_embed, rename_state

# ViTDet tensors a timm ViT has no place for (its names otherwise coincide with timm's).
VITDET_DROPPED = re.compile(r"(\.attn\.rel_pos_[hw]$|\.residual\.)")
# Statistics the classification recipes normalise with.
DIGITS_MEAN_STD = ((0.3,), (0.38,))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class LoadedModel:
    """A checkpoint rebuilt as a timm ViT, and what it came from."""

    model: nn.Module
    path: str
    host: str  # classification, detectron2 or mmseg
    is_karat: bool
    dataset: Optional[str] = None  # the classification data set (``--data-set``), when recorded
    seed: int = 0
    mean: Tuple[float, ...] = IMAGENET_MEAN_STD[0]
    std: Tuple[float, ...] = IMAGENET_MEAN_STD[1]
    notes: List[str] = field(default_factory=list)

    @property
    def has_head(self) -> bool:
        return getattr(self.model, "num_classes", 0) > 0

    @property
    def label(self) -> str:
        return "KArAt" if self.is_karat else "softmax"

    def describe(self) -> Dict[str, Any]:
        m = self.model
        return dict(path=self.path, host=self.host, kind=self.label, dataset=self.dataset,
                    depth=len(m.blocks), num_heads=m.blocks[0].attn.num_heads, tokens=_num_tokens(m),
                    karat=dataclasses.asdict(m.karat_cfg) if getattr(m, "karat_cfg", None) else None,
                    notes=self.notes)


def _num_tokens(model: nn.Module) -> int:
    g = model.patch_embed.grid_size
    return model.num_prefix_tokens + g[0] * g[1]


def load_model(path: str, karat_options: Optional[Mapping[str, Any]] = None,
               num_heads: Optional[int] = None) -> LoadedModel:
    """Read a classification, detectron2 or mmseg checkpoint as a timm ViT in eval mode."""
    import karat.models  # noqa: F401  registers the KArAt ViTs with timm

    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} does not hold a state dict (it holds a {type(ckpt).__name__}).")
    if "model_name" in ckpt and "model" in ckpt:
        loaded = _from_classification(path, ckpt, karat_options)
    else:
        state = ckpt.get("state_dict", ckpt.get("model", ckpt))
        state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items() if torch.is_tensor(v)}
        if any(k.startswith("backbone.net.") for k in state):
            loaded = _from_detectron2(path, state, karat_options, num_heads)
        elif any(re.match(r"(backbone\.)?layers\.\d+\.attn\.attn\.in_proj_weight", k) for k in state):
            loaded = _from_mmseg(path, state, ckpt.get("meta") or {}, karat_options, num_heads)
        else:
            raise ValueError(
                f"{path} is none of the checkpoints the analysis reads (its tensors look like {sorted(state)[:3]}). "
                f"Give a checkpoint.pth of classification.main, a detectron2 ViTDet checkpoint (backbone.net.*) or "
                f"an mmseg ViT backbone checkpoint (backbone.layers.*).")
    loaded.model.eval()
    return loaded


def _from_classification(path: str, ckpt: Mapping[str, Any], karat_options: Optional[Mapping[str, Any]]) -> LoadedModel:
    import timm

    kwargs = dict(ckpt.get("model_kwargs") or {})
    kwargs.pop("pretrained", None)
    if karat_options:
        raise ValueError("--karat options are for backbone checkpoints; a classification checkpoint records its own.")
    model = timm.create_model(ckpt["model_name"], **kwargs)
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    args = ckpt.get("args") or {}
    dataset = args.get("data_set")
    mean, std = DIGITS_MEAN_STD if dataset == "DIGITS" else IMAGENET_MEAN_STD
    if model.patch_embed.proj.in_channels != len(mean):
        mean, std = (mean[0],) * model.patch_embed.proj.in_channels, (std[0],) * model.patch_embed.proj.in_channels
    return LoadedModel(model, str(path), "classification", getattr(model, "karat_cfg", None) is not None,
                       dataset=dataset, seed=int(args.get("seed", 0)), mean=tuple(mean), std=tuple(std))


# ---------------------------------------------------------------------------------------------------- backbones
def infer_karat_options(state: Mapping[str, torch.Tensor], num_heads: int) -> Dict[str, Any]:
    """KArAt options readable from the operator tensors of block 0 (mode, basis family, grid, rank, mixed heads).

    Fourier and B-spline coefficients look alike; Fourier (the paper's default) is assumed: pass
    ``basis_type=SplineBasis`` (and ``order``) as an override for a spline checkpoint."""
    ops = {k.split(".attn.karat.operator.", 1)[1]: v for k, v in state.items()
           if re.match(r"blocks\.0\.attn\.karat\.operator\.", k)}
    if not ops:
        raise ValueError("No KArAt operator tensors found in block 0.")
    opts: Dict[str, Any] = {}
    if "layers.0.basis_scale" in ops:
        opts["modular_attn"] = False
        opts["depth"] = 1 + max(int(k.split(".")[1]) for k in ops if k.startswith("layers."))
        layer, n_heads = "layers.0.", ops["layers.0.basis_scale"].shape[0]
        if opts["depth"] > 1:
            opts["hidden_dim"] = ops["layers.0.basis_scale"].shape[2]
    else:
        w = ops["weight"]  # phi1_w2: (H, N, r); w1_phi2: (H, r, N)
        shapes = {tuple(o["weight"].shape) for o in _operators(state).values()}
        varies = [axis for axis in (1, 2) if len({sh[axis] for sh in shapes}) > 1]  # the key axis, when blocks differ
        key_axis = varies[0] if varies else (1 if w.shape[1] >= w.shape[2] else 2)
        opts["modular_mode"] = "phi1_w2" if key_axis == 1 else "w1_phi2"
        opts["hidden_dim"] = w.shape[3 - key_axis]
        layer, n_heads = "phi.", w.shape[0]
    if layer + "basis.translation" in ops:
        opts["basis_type"] = "WaveletBasis"
    elif layer + "basis.numerator" in ops:
        opts["basis_type"] = "RationalBasis"
        opts["rational_order"] = (ops[layer + "basis.numerator"].shape[-1] - 1,
                                  ops[layer + "basis.denominator"].shape[-1])
    else:
        opts["basis_type"] = "FourierBasis"
        opts["grid"] = ops[layer + "basis.coefficients"].shape[-1] // 2
    if n_heads != num_heads:
        opts.update(mixed_head=True, num_attention=int(n_heads))
    return opts


def _read_vitdet_config(path: str) -> Dict[str, Any]:
    """``model.backbone.net`` of the ``config.yaml`` detectron2 saves beside a run's checkpoints, if there is one."""
    cfg_file = Path(path).parent / "config.yaml"
    if not cfg_file.is_file():
        return {}
    try:
        import yaml

        cfg = yaml.safe_load(cfg_file.read_text())
        return dict(cfg["model"]["backbone"]["net"])
    except Exception:  # not a detectron2 LazyConfig dump: the tensors must do
        return {}


def _build_timm_vit(state: Dict[str, torch.Tensor], grid: Tuple[int, int], class_token: bool, num_heads: int,
                    karat_kwargs: Optional[Dict[str, Any]], notes: List[str]) -> nn.Module:
    """A classifier-less timm ViT of the shapes ``state`` (timm names) has, loaded with it."""
    import timm

    proj = state["patch_embed.proj.weight"]
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    kwargs: Dict[str, Any] = dict(img_size=(grid[0] * patch, grid[1] * patch), patch_size=patch, in_chans=in_chans,
                                  embed_dim=dim, depth=depth, num_heads=num_heads, num_classes=0,
                                  mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                                  qkv_bias="blocks.0.attn.qkv.bias" in state, class_token=class_token,
                                  global_pool="token" if class_token else "avg", fc_norm=False)
    if karat_kwargs is not None:
        model = timm.create_model("vit_tiny_patch16_224_karat", **kwargs, **karat_kwargs)
    else:
        model = timm.create_model("vit_tiny_patch16_224", **kwargs)
    expected = model.state_dict()
    fill = {"patch_embed.proj.bias": "zero (the host's patch embedding has no bias)",
            "norm.weight": "one (the host has no final norm)", "norm.bias": "zero (the host has no final norm)"}
    for k, why in fill.items():
        if k in expected and k not in state:
            state[k] = torch.ones_like(expected[k]) if why.startswith("one") else torch.zeros_like(expected[k])
            notes.append(f"{k} set to {why}")
    if class_token and "cls_token" not in state:
        raise ValueError("The backbone's operators include a class-token key but the checkpoint has no cls_token.")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    unknown = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    if wrong or unknown or missing:
        raise ValueError(f"The backbone does not map onto a timm ViT: shape mismatches {wrong[:3]}, unknown "
                         f"{unknown[:3]}, missing {missing[:3]}. If its KArAt options or head count were not "
                         f"recorded, give them (--num-heads, --karat basis_type=... grid=...).")
    model.load_state_dict(state)
    return model


def _karat_kwargs(state: Mapping[str, torch.Tensor], num_heads: int, recorded: Optional[Mapping[str, Any]],
                  overrides: Optional[Mapping[str, Any]], notes: List[str]) -> Optional[Dict[str, Any]]:
    if not any(is_karat_key(k) for k in state):
        if overrides:
            raise ValueError("--karat options were given but the checkpoint has no KArAt tensors (softmax).")
        return None
    if recorded:
        opts = {k: v for k, v in dict(recorded).items() if k in KArAtConfig.option_names()}
        notes.append("KArAt options read from the checkpoint's metadata")
    else:
        opts = infer_karat_options(state, num_heads)
        notes.append(f"KArAt options inferred from the tensors: {opts} (override with --karat key=value)")
    opts.update(overrides or {})
    opts["impl"] = "reference"
    cfg = pop_config(dict(karat_cfg=opts))  # validate now, with KArAtConfig's messages (field or host names)
    return host_kwargs(dataclasses.asdict(cfg))


def _grid_of(n: int, prefix: int) -> Tuple[int, int]:
    side = math.isqrt(max(n - prefix, 0))
    if side * side != n - prefix:
        raise ValueError(f"{n} tokens are not {prefix} prefix token(s) plus a square patch grid.")
    return side, side


def _resample_operators(state: Dict[str, torch.Tensor], dst: TokenLayout, mode: str, notes: List[str]) -> None:
    """Bring every block's operator tensors to ``dst`` (ViTDet's window blocks see fewer keys than global ones)."""
    moved = []
    for block, local in sorted(_operators(state).items()):
        prefix = f"blocks.{block}.attn.karat.operator."
        heads = next(v for k, v in local.items() if k.endswith("basis_scale")).shape[0]
        n = _key_count(local, mode)
        if n == dst.num_tokens:
            continue
        src = TokenLayout(0, _grid_of(n, 0))
        new = resample_operator_state(local, _axes(local, mode), src, dst)
        state.update({prefix + k: v for k, v in new.items()})
        moved.append((block, n, heads))
    if moved:
        notes.append(f"window attention of blocks {[b for b, _, _ in moved]} ({moved[0][1]} keys) resampled to the "
                     f"global {dst.grid[0]}x{dst.grid[1]} grid: maps of those blocks approximate the host's windows")


def _operators(state: Mapping[str, torch.Tensor]) -> Dict[int, Dict[str, torch.Tensor]]:
    """Block index -> that block's operator tensors (names relative to the operator)."""
    out: Dict[int, Dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if (m := re.match(r"blocks\.(\d+)\.attn\.karat\.operator\.(.*)$", k)):
            out.setdefault(int(m.group(1)), {})[m.group(2)] = v
    return out


def _key_count(ops: Mapping[str, torch.Tensor], mode: str = "phi1_w2") -> int:
    if "weight" in ops:  # modular: (H, N, r) for phi1_w2, (H, r, N) for w1_phi2
        return ops["weight"].shape[1 if mode == "phi1_w2" else 2]
    return ops["layers.0.basis_scale"].shape[1]


def _axes(ops: Mapping[str, torch.Tensor], mode: str) -> Dict[str, Tuple[int, ...]]:
    """Key-indexed axes of an operator's tensors, as ``KArAtOperator.key_axes`` gives them."""
    if "weight" in ops:
        return {k: (1 if mode == "phi1_w2" else 2,) for k in ops}
    last = max(int(k.split(".")[1]) for k in ops)
    out: Dict[str, Tuple[int, ...]] = {}
    for k in ops:
        i = int(k.split(".")[1])
        dims = ((1,) if i == 0 else ()) + ((2,) if i == last else ())
        if dims:
            out[k] = dims
    return out


def _from_detectron2(path: str, state: Dict[str, torch.Tensor], karat_options: Optional[Mapping[str, Any]],
                     num_heads: Optional[int]) -> LoadedModel:
    notes: List[str] = []
    net = {k[len("backbone.net."):]: v for k, v in state.items() if k.startswith("backbone.net.")}
    dropped = [k for k in net if VITDET_DROPPED.search(k)]
    net = {k: v for k, v in net.items() if k not in dropped}
    if any(k.endswith("rel_pos_h") for k in dropped):
        notes.append("ViTDet's relative-position bias is not part of a timm ViT: maps are computed without it")
    cfg = _read_vitdet_config(path)
    dim = net["patch_embed.proj.weight"].shape[0]
    ops0 = {k: v for k, v in net.items() if k.startswith("blocks.0.attn.karat.operator.")}
    heads = num_heads or cfg.get("num_heads") or (next(iter(ops0.values())).shape[0] if ops0 else max(dim // 64, 1))
    karat_kwargs = _karat_kwargs(net, int(heads), cfg.get("karat"), karat_options, notes)
    mode = (karat_kwargs or {}).get("modular_mode", "phi1_w2")
    counts = sorted({_key_count(ops, mode) for ops in _operators(net).values()})
    pos = net.pop("pos_embed", None)
    if counts:
        grid = _grid_of(counts[-1], 0)
    elif pos is not None:
        grid = _grid_of(pos.shape[1] - (0 if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1] else 1), 0)
    else:
        raise ValueError(f"{path}: a ViTDet backbone without position embedding or KArAt operators; its patch grid "
                         f"cannot be told.")
    if pos is not None:  # the pretraining grid (with or without a class slot) -> the patch grid, no class slot
        net["pos_embed"], pos_notes = fit_pos_embed(pos, grid, cls_slot=False)
        notes += pos_notes
    if karat_kwargs is not None:
        _resample_operators(net, TokenLayout(0, grid), mode, notes)
    model = _build_timm_vit(net, grid, False, int(heads), karat_kwargs, notes)
    return LoadedModel(model, str(path), "detectron2", karat_kwargs is not None, notes=notes)


def mmseg_to_timm(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmseg ``VisionTransformer`` names -> timm's (``karat.transfer.RENAMES['mmseg']`` read backwards)."""
    return rename_state(state, "mmseg", inverse=True)[0]


def _from_mmseg(path: str, state: Dict[str, torch.Tensor], meta: Mapping[str, Any],
                karat_options: Optional[Mapping[str, Any]], num_heads: Optional[int]) -> LoadedModel:
    notes: List[str] = []
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    recorded = dict((meta.get("backbone") or {})) if isinstance(meta, Mapping) else {}
    timm_state = mmseg_to_timm(state)
    dim = timm_state["patch_embed.proj.weight"].shape[0]
    ops0 = [v for k, v in timm_state.items() if k.startswith("blocks.0.attn.karat.operator.")]
    heads = num_heads or recorded.get("num_heads") or (ops0[0].shape[0] if ops0 else max(dim // 64, 1))
    karat_kwargs = _karat_kwargs(timm_state, int(heads), recorded.get("karat_cfg"), karat_options, notes)
    pos = timm_state["pos_embed"]  # mmseg always keeps a class slot
    grid = _grid_of(pos.shape[1], 1)
    if "with_cls_token" in recorded:
        with_cls = bool(recorded["with_cls_token"])
    elif ops0:
        with_cls = _key_count(_operators(timm_state)[0], karat_kwargs.get("modular_mode", "phi1_w2")) == pos.shape[1]
    else:
        with_cls = True
    if not with_cls:
        timm_state["pos_embed"] = pos[:, 1:]
        timm_state.pop("cls_token", None)
    model = _build_timm_vit(timm_state, grid, with_cls, int(heads), karat_kwargs, notes)
    return LoadedModel(model, str(path), "mmseg", karat_kwargs is not None, notes=notes)
