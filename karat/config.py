"""The one options object of KArAt, named after the paper's command-line flags (snake case).

Everything is validated at construction so that a bad value fails with a message naming the option,
the value and what is allowed, instead of a shape error deep inside torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

import torch.nn as nn

from . import options
from .activations import ZeroModule

BASIS_TYPES = ("FourierBasis", "SplineBasis", "WaveletBasis", "RationalBasis")
WAVELET_TYPES = ("mexican_hat", "morlet", "dog", "meyer", "shannon")
MODULAR_MODES = ("phi1_w2", "w1_phi2")
IMPLS = ("auto", "reference", "efficient", "fused")


def _opt(default: Any, help: str, **meta: Any) -> Any:
    """A field with its option metadata (see ``karat.options``: help, choices, host_name, model_decides, ...)."""
    return field(default=default, metadata=dict(help=help, **meta))


def _fail(option: str, value: Any, allowed: str) -> None:
    raise ValueError(f"KArAt option {option}={value!r} is invalid: {allowed}.")


def resolve_base_fn(name: str) -> type[nn.Module]:
    """Map a base-function name (``ZeroModule``, ``nn.SiLU``, ``SiLU``, ``torch.nn.GELU``) to a class."""
    short = name.split(".")[-1] if isinstance(name, str) else ""
    if short == "ZeroModule":
        return ZeroModule
    cls = getattr(nn, short, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        _fail("base_fn", name, "use 'ZeroModule' or the name of a torch.nn activation, e.g. 'nn.SiLU', "
              "'SiLU', 'nn.GELU', 'nn.Identity'")
    try:
        cls()
    except TypeError:
        _fail("base_fn", name, f"torch.nn.{short} cannot be built without arguments; use an activation "
              "such as 'nn.SiLU', 'nn.ReLU', 'nn.GELU' or 'nn.Identity'")
    return cls


@dataclass(frozen=True)
class KArAtConfig:
    """Options of the KArAt operator (spec sections 2-3).

    Defaults are the paper's headline setting: Fourier basis, G = 3, zero base, modular ``phi1_w2`` with
    rank 12, blockwise (every head of every block owns its operator).
    """

    base_fn: str = _opt("ZeroModule", "base activation b(x) of each KAN edge: ZeroModule (none) or a torch.nn "
                        "activation by name, e.g. nn.SiLU")
    basis_type: str = _opt("FourierBasis", "basis of the learnable edge functions", choices=BASIS_TYPES)
    grid: int = _opt(3, "G: Fourier frequencies 1..G, or B-spline intervals", model_decides=True)
    order: int = _opt(3, "B-spline order (SplineBasis)")
    grid_range: Tuple[float, float] = _opt((-1.0, 1.0), "low and high end of the B-spline grid (SplineBasis)")
    wavelet_type: str = _opt("mexican_hat", "mother wavelet (WaveletBasis)", choices=WAVELET_TYPES)
    rational_order: Tuple[int, int] = _opt((5, 4), "numerator and denominator orders m n (RationalBasis)")
    depth: int = _opt(2, "KAN depth when not modular", host_name="karat_depth")
    hidden_dim: int = _opt(12, "rank r of the modular operator (hidden width of the KAN)")
    mixed_head: bool = _opt(False, "only --num_attention heads per block use KArAt, the rest keep softmax")
    num_attention: Optional[int] = _opt(None, "KArAt heads per block with --mixed_head (default: the model's)")
    universal: bool = _opt(False, "one operator per head index, shared by all blocks")
    blockwise: bool = _opt(False, "every head of every block owns its operator (the default sharing)")
    modular_attn: bool = _opt(True, "modular operator (depth 2, rank --hidden_dim) instead of a --depth KAN")
    modular_mode: str = _opt("phi1_w2", "order of the modular operator's KAN layer and projection",
                             choices=MODULAR_MODES)
    project_l1: bool = _opt(False, "project each attention row onto the probability simplex")
    basis_not_trainable: bool = _opt(False, "freeze the basis coefficients")
    base_not_trainable: bool = _opt(False, "freeze the base term")
    impl: str = _opt("auto", "evaluation path (the same numbers; speed and memory differ)", choices=IMPLS,
                     structural=False)

    def __post_init__(self) -> None:
        # Normalise list inputs (argparse nargs, YAML/JSON configs) into tuples; keeps the dataclass hashable.
        object.__setattr__(self, "grid_range", tuple(float(v) for v in self.grid_range))
        object.__setattr__(self, "rational_order", tuple(self.rational_order))
        self._validate()

    def _validate(self) -> None:
        for f in fields(self):  # options with a closed set of values (their field metadata's choices)
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                _fail(f.name, getattr(self, f.name), f"choose one of {', '.join(allowed)}")
        for name in ("grid", "hidden_dim", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "it must be an integer >= 1")
        if not isinstance(self.order, int) or isinstance(self.order, bool) or self.order < 0:
            _fail("order", self.order, "the B-spline order must be an integer >= 0")
        lo_hi = self.grid_range
        if len(lo_hi) == 2 and not (all(math.isfinite(v) for v in lo_hi) and math.isfinite(lo_hi[1] - lo_hi[0])):
            _fail("grid_range", self.grid_range, "both ends and their difference must be finite numbers (the "
                  "B-spline knots are spaced (high - low) / grid apart), e.g. (-1.0, 1.0)")
        if len(lo_hi) != 2 or not lo_hi[0] < lo_hi[1]:
            _fail("grid_range", self.grid_range, "give two numbers (low, high) with low < high")
        ro = self.rational_order
        if len(ro) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ro):
            _fail("rational_order", self.rational_order,
                  "give two integers (numerator order m, denominator order n), both >= 0")
        if self.universal and self.blockwise:
            _fail("universal", self.universal, "universal and blockwise sharing exclude each other; "
                  "set only one (blockwise is the default when neither is set)")
        if self.num_attention is not None:
            k = self.num_attention
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                _fail("num_attention", self.num_attention, "it must be an integer >= 1 (KArAt heads per block)")
        resolve_base_fn(self.base_fn)

    # ----------------------------------------------------------------------------------------------
    @property
    def sharing(self) -> str:
        return "universal" if self.universal else "blockwise"

    def karat_heads(self, num_heads: int) -> int:
        """How many of ``num_heads`` heads use KArAt (the first ones); the rest keep softmax."""
        if not self.mixed_head:
            return num_heads
        k = self.num_attention if self.num_attention is not None else 1
        if k > num_heads:
            _fail("num_attention", k, f"it cannot exceed the number of heads ({num_heads})")
        return k

    def replace(self, **changes: Any) -> "KArAtConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def option_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def pop_from(cls, kwargs: dict, defaults: Optional[Mapping[str, Any]] = None) -> "KArAtConfig":
        """Take the KArAt options out of a keyword dict (e.g. ``create_model`` kwargs) and build a config.

        ``depth`` belongs to the host model (number of blocks), so the KAN depth is ``karat_depth`` there.
        A ready ``karat_cfg`` (a ``KArAtConfig`` or a mapping) may be passed too; explicit keywords win."""
        return options.pop_options(cls, kwargs, defaults)


# ------------------------------------------------------------------------------------------------------
# Every host reaches the options through these functions, which look ``KArAtConfig`` up in this module when
# called: a new field appears in every host at once (tests/test_option_table.py swaps in a subclass).
# ------------------------------------------------------------------------------------------------------
def pop_config(kwargs: dict, defaults: Optional[Mapping[str, Any]] = None, *, refuse_renamed: bool = False,
               where: str = "") -> KArAtConfig:
    """The KArAt options out of a host's keywords (``create_model``, an mmseg backbone); see ``options.pop_options``."""
    return options.pop_options(KArAtConfig, kwargs, defaults, refuse_renamed=refuse_renamed, where=where)


def config_from_kwargs(kwargs: Mapping[str, Any], *, where: str = "") -> KArAtConfig:
    """A config from KArAt options only (host names, e.g. a backbone's ``karat=dict(...)``); unknown keys fail."""
    return options.from_kwargs(KArAtConfig, kwargs, where=where)


def check_host_keywords(given: Any, host_keywords: Any, where: str) -> None:
    """Keywords that neither a host's constructor nor KArAt takes fail with a 'did you mean' (see ``options``)."""
    options.check_keywords(given, host_keywords, KArAtConfig, where)


def add_argparse_arguments(parser: Any) -> None:
    """One ``--<option>`` flag per KArAt option (the paper's flag names) on a parser or argument group."""
    options.add_argparse_arguments(parser, KArAtConfig)


def kwargs_from_namespace(ns: Any) -> Dict[str, Any]:
    """The KArAt flags of parsed arguments as ``create_model`` keywords (unset ones left to the model)."""
    return options.kwargs_from_namespace(ns, KArAtConfig)


def config_from_namespace(ns: Any) -> KArAtConfig:
    return config_from_kwargs(kwargs_from_namespace(ns))


def yacs_node(node_cls: type) -> Any:
    """A yacs node (``node_cls``: yacs' or detectron2's ``CfgNode``) with the KArAt options and defaults."""
    return options.yacs_node(KArAtConfig, node_cls)


def kwargs_from_yacs(node: Mapping[str, Any]) -> Dict[str, Any]:
    """The KArAt options of a yacs node made by :func:`yacs_node`, as host keywords."""
    return options.kwargs_from_yacs(node, KArAtConfig)


def config_from_yacs(node: Mapping[str, Any]) -> KArAtConfig:
    return config_from_kwargs(kwargs_from_yacs(node))


def host_kwargs(values: Mapping[str, Any]) -> Dict[str, Any]:
    """Field-named options (``dataclasses.asdict(cfg)``, recorded metadata) as host keywords."""
    return options.to_kwargs(values, KArAtConfig)


def cli_flags() -> Dict[str, str]:
    """Host keyword -> the command-line flag that sets it (``karat_depth`` -> ``--depth``)."""
    return options.cli_flags(KArAtConfig)


def non_structural_options() -> Tuple[str, ...]:
    """Host keywords of the options that change no parameter (a resumed run may change them)."""
    return options.non_structural(KArAtConfig)
