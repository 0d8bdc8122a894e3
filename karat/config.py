"""The one options object of KArAt, named after the paper's command-line flags (snake case).

Everything is validated at construction so that a bad value fails with a message naming the option,
the value and what is allowed, instead of a shape error deep inside torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Tuple

import torch.nn as nn

from .activations import ZeroModule

BASIS_TYPES = ("FourierBasis", "SplineBasis", "WaveletBasis", "RationalBasis")
WAVELET_TYPES = ("mexican_hat", "morlet", "dog", "meyer", "shannon")
MODULAR_MODES = ("phi1_w2", "w1_phi2")
IMPLS = ("auto", "reference", "efficient", "fused")
# Keyword names that mean something else to a host model: timm's ``depth`` is the number of blocks.
HOST_OWNED = ("depth",)
KWARG_ALIASES = {"karat_depth": "depth"}


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

    base_fn: str = "ZeroModule"
    basis_type: str = "FourierBasis"
    grid: int = 3
    order: int = 3
    grid_range: Tuple[float, float] = (-1.0, 1.0)
    wavelet_type: str = "mexican_hat"
    rational_order: Tuple[int, int] = (5, 4)
    depth: int = 2
    hidden_dim: int = 12
    mixed_head: bool = False
    num_attention: Optional[int] = None
    universal: bool = False
    blockwise: bool = False
    modular_attn: bool = True
    modular_mode: str = "phi1_w2"
    project_l1: bool = False
    basis_not_trainable: bool = False
    base_not_trainable: bool = False
    impl: str = "auto"

    def __post_init__(self) -> None:
        # Normalise list inputs (argparse nargs, YAML/JSON configs) into tuples; keeps the dataclass hashable.
        object.__setattr__(self, "grid_range", tuple(float(v) for v in self.grid_range))
        object.__setattr__(self, "rational_order", tuple(self.rational_order))
        self._validate()

    def _validate(self) -> None:
        if self.basis_type not in BASIS_TYPES:
            _fail("basis_type", self.basis_type, f"choose one of {', '.join(BASIS_TYPES)}")
        if self.wavelet_type not in WAVELET_TYPES:
            _fail("wavelet_type", self.wavelet_type, f"choose one of {', '.join(WAVELET_TYPES)}")
        if self.modular_mode not in MODULAR_MODES:
            _fail("modular_mode", self.modular_mode, f"choose one of {', '.join(MODULAR_MODES)}")
        if self.impl not in IMPLS:
            _fail("impl", self.impl, f"choose one of {', '.join(IMPLS)}")
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
            if not isinstance(self.num_attention, int) or isinstance(self.num_attention, bool) or self.num_attention < 1:
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
        A ready ``karat_cfg`` (a ``KArAtConfig`` or a mapping) may be passed too; explicit keywords win.
        """
        base = kwargs.pop("karat_cfg", None)
        values: dict = dict(defaults or {})
        if isinstance(base, KArAtConfig):
            values.update(dataclasses.asdict(base))
        elif base is not None:
            values.update(dict(base))
        for name in cls.option_names():
            if name in kwargs and name not in HOST_OWNED:
                values[name] = kwargs.pop(name)
        for alias, name in KWARG_ALIASES.items():
            if alias in kwargs:
                values[name] = kwargs.pop(alias)
        unknown = set(values) - set(cls.option_names())
        if unknown:
            raise ValueError(f"Unknown KArAt option(s) {sorted(unknown)}; known options: {list(cls.option_names())}.")
        return cls(**values)
