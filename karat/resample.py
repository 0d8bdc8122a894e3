"""Changing the number of tokens of KArAt operators (spec section 6).

The operator's parameters are indexed by key position, so a checkpoint is tied to its token count. To move it
to another layout (another image size, a ViTDet window of 14 x 14 without class token, a 64 x 64 global block):

* prefix tokens (class, registers) are kept, or dropped when the target has none;
* the h x w grid part is resampled bicubically to h' x w', as timm resamples absolute position embeddings;
* every sum over keys keeps its magnitude: the multiplicative weights of grid keys (``weight``, the basis
  scale ``w_s`` and the base weight ``w_b``) are multiplied by ``h w / (h' w')``, so a sum over the new keys
  approximates the old sum over the old keys.

The same function serves twice. Once on a checkpoint (:func:`resample_karat_state_dict`, :func:`resample_operator`),
and at run time (:func:`operator_at`), the way timm and mmseg interpolate absolute position embeddings on every
forward: a model built for one grid evaluates another with its operator resampled to that grid. The run-time
operator is a differentiable function of the stored one (training at several sizes trains the stored weights);
where nothing needs gradients it is cached per layout until the weights change.

While a graph is recorded (``torch.export``, either ONNX exporter) nothing is cached, and a layout whose grid is
symbolic (the dynamo exporter with dynamic spatial axes) is resampled in graph ops computed from the input's size, so
one exported graph evaluates every image size as the eager model does (:func:`is_symbolic`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .operator import RUNTIME_ATTRS, KArAtOperator

# Parameter names (last component) that multiply an edge or a key's contribution: rescaled with the key count.
SUM_WEIGHTS = ("weight", "basis_scale", "base_weight")


@dataclass(frozen=True)
class TokenLayout:
    """Keys one attention sees: ``prefix`` non-spatial tokens followed by a row-major ``grid`` of patches."""

    prefix: int
    grid: Tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    @classmethod
    def infer(cls, num_tokens: int, prefix: int) -> "TokenLayout":
        """A square grid after ``prefix`` tokens; a clear error if ``num_tokens`` is not one."""
        side = math.isqrt(max(num_tokens - prefix, 0))
        if num_tokens <= prefix or side * side != num_tokens - prefix:
            raise ValueError(
                f"Cannot resample KArAt weights for {num_tokens} tokens with {prefix} prefix token(s): "
                f"{num_tokens - prefix} is not a square grid of patches. Give the source layout explicitly "
                f"(TokenLayout(prefix, (h, w))).")
        return cls(prefix, (side, side))


def resample_key_axis(t: torch.Tensor, axis: int, src: TokenLayout, dst: TokenLayout, rescale: bool) -> torch.Tensor:
    """Resample axis ``axis`` of ``t`` (indexed by key) from layout ``src`` to ``dst``."""
    if t.shape[axis] != src.num_tokens:
        raise ValueError(f"Tensor has {t.shape[axis]} keys on axis {axis}, the source layout {src} has "
                         f"{src.num_tokens}.")
    if dst.prefix > src.prefix:
        raise ValueError(f"Cannot create prefix tokens: the source has {src.prefix}, the target needs {dst.prefix}.")
    moved = t.movedim(axis, -1)
    prefix = moved[..., : dst.prefix]  # class token first, then registers
    grid = moved[..., src.prefix:]
    symbolic = is_symbolic(dst)
    if symbolic or src.grid != dst.grid:  # a symbolic grid may be the stored one: then the resampling is exact
        lead = grid.shape[:-1]
        # bicubic needs fp32 or more: half precision is upcast, float64 (tests, exact comparisons) kept
        img = grid.reshape(1, -1, *src.grid).to(torch.promote_types(t.dtype, torch.float32))
        img = _bicubic(img, src.grid, dst.grid, symbolic)
        grid = img.reshape(*lead, dst.grid[0] * dst.grid[1]).to(t.dtype)
        if rescale and symbolic:
            grid = grid * (src.grid[0] * src.grid[1] / _graph_scalar(dst.grid[0] * dst.grid[1], grid))
        elif rescale:
            grid = grid * (src.grid[0] * src.grid[1] / (dst.grid[0] * dst.grid[1]))
    return torch.cat([prefix, grid], dim=-1).movedim(-1, axis)


def _bicubic(img: torch.Tensor, src: Tuple[int, int], dst: Tuple, symbolic: bool) -> torch.Tensor:
    """``img`` (1, C, *src) resized bicubically to ``dst``, antialiased when a side shrinks (torch's antialiased
    bicubic is another filter, a = -0.5 over the widened support, not a = -0.75). With a symbolic ``dst`` the
    choice is made when the graph runs: both resizes are recorded and the one the eager path takes selected."""
    if not symbolic:
        antialias = dst[0] < src[0] or dst[1] < src[1]
        return F.interpolate(img, size=dst, mode="bicubic", align_corners=False, antialias=antialias)
    plain = F.interpolate(img, size=dst, mode="bicubic", align_corners=False, antialias=False)
    smooth = F.interpolate(img, size=dst, mode="bicubic", align_corners=False, antialias=True)
    shrinks = (_graph_scalar(dst[0], img) < src[0]) | (_graph_scalar(dst[1], img) < src[1])
    return torch.where(shrinks, smooth, plain)


def _graph_scalar(size, like: torch.Tensor) -> torch.Tensor:
    """A (possibly symbolic) size as a 0-d tensor of ``like``'s dtype: recorded as a graph op, never a constant."""
    return torch.scalar_tensor(size, dtype=like.dtype, device=like.device)


def is_symbolic(layout: TokenLayout) -> bool:
    """Whether ``layout``'s sizes are symbols of a graph being recorded (``torch.export`` or the dynamo ONNX exporter
    with dynamic spatial axes): their values are known only when the graph runs, so nothing may compare them to
    Python ints (which would specialise the graph to the example input) or key a cache with them."""
    return any(isinstance(d, torch.SymInt) for d in (layout.prefix, *layout.grid))


def recording() -> bool:
    """Whether a graph is being recorded (``torch.export``, either ONNX exporter): the run-time operator is then
    computed in graph ops from the stored weights, never served from the cache (whose tensors the exporters cannot
    capture)."""
    return bool(torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def resample_operator_state(state: Dict[str, torch.Tensor], axes: Dict[str, Tuple[int, ...]], src: TokenLayout,
                            dst: TokenLayout) -> Dict[str, torch.Tensor]:
    """Resample one operator's tensors (names relative to the operator, ``axes`` from ``key_axes()``)."""
    out = dict(state)
    for name, dims in axes.items():
        t = state[name]
        for axis in dims:
            t = resample_key_axis(t, axis, src, dst, rescale=name.split(".")[-1] in SUM_WEIGHTS)
        out[name] = t
    return out


def resample_operator(op: KArAtOperator, src: TokenLayout, dst: TokenLayout) -> KArAtOperator:
    """A new operator for ``dst``'s token count holding ``op``'s weights resampled from ``src``, on the same device
    and dtype with the same ``requires_grad`` flags: what a host's ``set_input_size`` / ``set_window_size`` swaps in,
    as timm swaps in resized position tables. An operator shared by several blocks (universal) is resampled once per
    target, so every block that held it gets the same new one."""
    _check_source(op, src)
    if src == dst:
        return op
    done: Dict[TokenLayout, KArAtOperator] = op.__dict__.setdefault(_DONE_ATTR, {})
    if dst in done:
        return done[dst]
    new = _build_like(op, dst.num_tokens)
    with torch.no_grad():
        new.load_state_dict(resample_operator_state(op.state_dict(), op.key_axes(), src, dst))
    flags = {name: p.requires_grad for name, p in op.named_parameters()}
    for name, p in new.named_parameters():
        p.requires_grad_(flags[name])
    done[dst] = new.train(op.training)
    return new


def _build_like(op: KArAtOperator, num_tokens: int) -> KArAtOperator:
    """A fresh operator like ``op`` for ``num_tokens`` keys, on ``op``'s device and dtype. Built on the CPU under a
    forked generator: its random initialisation is overwritten by the caller and must not move anyone's RNG."""
    ref = next(op.parameters())
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        new = KArAtOperator(op.num_heads, num_tokens, op.cfg)
    return new.to(device=ref.device, dtype=ref.dtype)


# ------------------------------------------------------------------------------------------------------------------
# Run time: a model built for one token layout evaluates another
# ------------------------------------------------------------------------------------------------------------------
# Layouts (and operator skeletons) kept per operator: multi-scale training and `mode='whole'` inference on images of
# many sizes would otherwise grow the cache without bound. Recomputing an evicted entry costs one interpolation.
RUNTIME_CACHE_SIZE = 16
_CACHE_ATTR, _SKELETON_ATTR, _DONE_ATTR = RUNTIME_ATTRS  # plain attributes: never in state_dict() nor pickled


def _lru_get(table: "OrderedDict[Hashable, object]", key: Hashable, make: Callable[[], object]) -> object:
    if key in table:
        table.move_to_end(key)
        return table[key]
    value = table[key] = make()
    while len(table) > RUNTIME_CACHE_SIZE:
        table.popitem(last=False)
    return value


def _skeleton(op: KArAtOperator, num_tokens: int) -> KArAtOperator:
    """An operator for ``num_tokens`` keys without weights (its parameter slots empty): the attributes and buffers
    (frequencies, knots, a Shannon window over the keys) exactly as :func:`resample_operator` would build them."""
    _build_skeleton(op, num_tokens)
    ref = next(op.parameters())
    return _lru_get(op.__dict__[_SKELETON_ATTR], (num_tokens, ref.device, ref.dtype, op.training), _no_skeleton)


def _no_skeleton() -> KArAtOperator:
    raise AssertionError("_build_skeleton has built it")


@torch.compiler.assume_constant_result
def _build_skeleton(op: KArAtOperator, num_tokens: int) -> bool:
    """Build :func:`_skeleton`'s operator into ``op``'s table unless it is there. ``torch.compile`` runs this eagerly
    while it traces (and keeps the answer as a constant): building a module (a forked RNG, a device context) inside
    the traced region would break the graph there, so a compiled model's first call at a new size would fail with
    ``fullgraph=True``; the traced code only looks the skeleton up."""
    ref = next(op.parameters())
    table = op.__dict__.setdefault(_SKELETON_ATTR, OrderedDict())

    def make() -> KArAtOperator:
        new = _build_like(op, num_tokens).train(op.training)
        for module in new.modules():
            for name in module._parameters:
                module._parameters[name] = None
        return new

    _lru_get(table, (num_tokens, ref.device, ref.dtype, op.training), make)
    return True


def _with_parameters(skeleton: nn.Module, tensors: Dict[str, torch.Tensor], prefix: str = "") -> nn.Module:
    """A shallow copy of ``skeleton`` (buffers and attributes shared) whose parameter slots hold ``tensors``: plain
    tensors, so gradients flow through them to whatever they were computed from."""
    new = type(skeleton).__new__(type(skeleton))
    new.__dict__.update(skeleton.__dict__)
    new.__dict__["_parameters"] = {name: tensors[prefix + name] for name in skeleton._parameters}
    new.__dict__["_modules"] = {name: _with_parameters(child, tensors, f"{prefix}{name}.")
                                for name, child in skeleton._modules.items()}
    return new


def resampled_operator(op: KArAtOperator, src: TokenLayout, dst: TokenLayout) -> KArAtOperator:
    """``op`` (stored for ``src``) as an operator for ``dst``: its parameters are :func:`resample_operator_state` of
    ``op``'s, a differentiable function of them, so gradients reach the stored weights. Every evaluation path
    (reference, efficient, the C++ and Triton kernels) reads its tensors from the operator it is given, so each
    evaluates this one unchanged. Not cached: see :func:`operator_at`."""
    _check_source(op, src)
    tensors = resample_operator_state(dict(op.named_parameters()), op.key_axes(), src, dst)
    skeleton = _recorded_skeleton(op, dst.num_tokens) if recording() or is_symbolic(dst) else \
        _skeleton(op, dst.num_tokens)
    return _with_parameters(skeleton, tensors)


def _recorded_skeleton(op: KArAtOperator, num_tokens) -> KArAtOperator:
    """What :func:`_skeleton` builds, made from ``op`` itself without building a module (an exporter records the
    forward only): its modules copied shallowly, the sizes indexed by key set to ``num_tokens`` (maybe symbolic),
    and the one buffer that depends on the key count, a Shannon wavelet's Hamming window over key inputs, recomputed
    in graph ops."""
    key_dims: Dict[str, set] = {}
    for name, axes in op.key_axes().items():
        key_dims.setdefault(name.rpartition(".")[0], set()).update(axes)

    def copy(module: nn.Module, path: str) -> nn.Module:
        new = type(module).__new__(type(module))
        new.__dict__.update(module.__dict__)
        new.__dict__["_modules"] = {name: copy(child, f"{path}{name}.")
                                    for name, child in module.__dict__["_modules"].items()}
        dims = key_dims.get(path.rstrip("."), set())
        if 1 in dims and hasattr(new, "in_features"):
            new.in_features = num_tokens
        if 2 in dims and hasattr(new, "out_features"):
            new.out_features = num_tokens
        if 1 in dims and isinstance(new.__dict__["_buffers"].get("window"), torch.Tensor) and \
                getattr(new, "wavelet_type", None) == "shannon":
            new.__dict__["_buffers"] = dict(new._buffers, window=_hamming(num_tokens, new._buffers["window"]))
        return new

    new = copy(_unproxied(op), "")
    new.num_tokens = num_tokens
    return new


def _unproxied(module: nn.Module) -> nn.Module:
    """The module itself, not the stand-in that ``torch.export``'s tracer hands out for a module reached a second time
    (a universal operator, shared by every block), whose class and child lookups only its tracer knows."""
    get_base = getattr(type(module), "get_base", None)
    while get_base is not None:
        module = get_base(module)
        get_base = getattr(type(module), "get_base", None)
    return module


def _hamming(n, like: torch.Tensor) -> torch.Tensor:
    """``torch.hamming_window(n, periodic=False)`` for a key count ``n`` that may be symbolic (graph ops)."""
    i = torch.arange(n, dtype=torch.float64, device=like.device)
    return (0.54 - 0.46 * torch.cos(i * (2 * math.pi) / (_graph_scalar(n, i) - 1))).to(like.dtype)


def _weights_key(op: KArAtOperator) -> Tuple:
    """Changes whenever the weights may have: an optimizer step or ``load_state_dict`` (in-place: the version
    counter), ``.to()`` / ``.data =`` (another storage), a swapped parameter (another object)."""
    return tuple((id(p), p.data_ptr(), p._version, p.device, p.dtype) for p in op.parameters())


def operator_at(op: KArAtOperator, src: TokenLayout, dst: TokenLayout) -> KArAtOperator:
    """The operator to evaluate for ``dst`` keys, ``op`` being stored for ``src``: ``op`` itself when they are equal,
    else :func:`resampled_operator`.

    Where autograd would record nothing (``torch.no_grad``, inference, frozen KArAt weights) the result is cached on
    ``op`` per layout, so a fixed non-native size pays the interpolation once, and an operator shared by all blocks
    (universal) is resampled once per layout for all of them. The cache is dropped as soon as the weights change
    (optimizer step, ``load_state_dict``, ``.to()``). While training, each call resamples, differentiably: a cached
    tensor would carry a graph that the first backward frees. While a graph is recorded, never cached: the graph
    computes the resampled operator from the stored weights (:func:`recording`)."""
    symbolic = is_symbolic(dst)
    if not symbolic and src == dst:
        return op
    params = list(op.parameters())
    if symbolic or recording() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return resampled_operator(op, src, dst)
    key = (torch.is_inference_mode_enabled(), _weights_key(op))
    cache = op.__dict__.get(_CACHE_ATTR)
    if cache is None or cache[0] != key:
        cache = op.__dict__[_CACHE_ATTR] = (key, OrderedDict())

    def make() -> KArAtOperator:
        with torch.no_grad():
            return resampled_operator(op, src, dst)

    return _lru_get(cache[1], (src, dst), make)


def _check_source(op: KArAtOperator, src: TokenLayout) -> None:
    if src.num_tokens != op.num_tokens:
        raise ValueError(f"Source layout {_describe(src)} does not match the operator, "
                         f"built for {op.num_tokens} tokens.")


LayoutFn = Callable[[str, KArAtOperator], TokenLayout]


@dataclass
class ResampleReport:
    """What :func:`resample_karat_state_dict` did, for the user to read: tensor names per (source, target) layout."""

    moves: Dict[Tuple[TokenLayout, TokenLayout], List[str]] = field(default_factory=dict)

    @property
    def resampled(self) -> List[str]:
        return [name for names in self.moves.values() for name in names]

    def __str__(self) -> str:
        if not self.moves:
            return "KArAt weights already match the model's token count; nothing resampled."
        return "\n".join(f"Resampled {len(names)} KArAt tensors from {_describe(src)} to {_describe(dst)}."
                         for (src, dst), names in self.moves.items())


def _describe(layout: TokenLayout) -> str:
    return f"{layout.num_tokens} tokens ({layout.prefix} prefix + {layout.grid[0]}x{layout.grid[1]})"


def resample_karat_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module,
                              dst: Union[TokenLayout, LayoutFn], src: Optional[TokenLayout] = None,
                              src_prefix: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], ResampleReport]:
    """Resample every KArAt operator tensor of ``state_dict`` to the token layout of ``model``'s operators.

    ``dst`` is one layout for the whole model, or a function ``(operator name, operator) -> layout`` for hosts
    whose blocks see different token counts (ViTDet's windowed and global blocks). ``src`` defaults to a square
    grid after ``src_prefix`` prefix tokens (default: the target's), inferred from the checkpoint's token count.
    Tensors of other modules are returned unchanged.
    """
    layout_of: LayoutFn = dst if callable(dst) else (lambda _name, _op: dst)
    out = dict(state_dict)
    report = ResampleReport()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, KArAtOperator):
            continue
        axes = module.key_axes()
        names = {f"{prefix}.{n}": n for n in axes}
        present = [full for full in names if full in state_dict]
        if not present:
            continue
        target = layout_of(prefix, module)
        if target.num_tokens != module.num_tokens:
            raise ValueError(f"Target layout {_describe(target)} of {prefix} does not match its operator, which "
                             f"was built for {module.num_tokens} tokens.")
        n_src = state_dict[present[0]].shape[axes[names[present[0]]][0]]
        source = src or TokenLayout.infer(n_src, target.prefix if src_prefix is None else src_prefix)
        if source.num_tokens != n_src:
            raise ValueError(f"{present[0]} has {n_src} keys but the source layout {_describe(source)} has "
                             f"{source.num_tokens}; the checkpoint was made for another token count.")
        if source == target:
            continue
        local = {names[full]: state_dict[full] for full in present}
        new = resample_operator_state(local, {names[f]: axes[names[f]] for f in present}, source, target)
        for full in present:
            out[full] = new[names[full]]
        report.moves.setdefault((source, target), []).extend(present)
    return out, report
