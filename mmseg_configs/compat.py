"""Resuming mmengine 0.10 runs under torch >= 2.6, where ``torch.load`` reads weights only by default.

mmengine's resume checkpoints hold its ``MessageHub`` state: ``HistoryBuffer`` objects, numpy arrays and
scalars, and the buffers' statistics methods, which pickle (protocol 2) as ``getattr(HistoryBuffer, "mean")``.
torch >= 2.6 refuses those, so ``tools/train.py --resume`` fails with an ``UnpicklingError``. This module
replaces mmengine's local-file checkpoint loader with one that still loads weights-only and allows exactly
what those checkpoints hold (listed by reading the pickles mmengine's runner writes, see
``tests/test_loading_safety.py``), and only while mmengine loads a checkpoint (``load_from``, ``--resume``,
``init_cfg``); every other ``torch.load`` is left as it was.

``getattr`` itself is never allowed: the name ``builtins.getattr`` resolves to :func:`history_buffer_method`,
which returns a ``HistoryBuffer`` statistics method and refuses anything else, so a crafted checkpoint cannot
reach ``builtins.__import__``, ``os.system`` or any other callable through it.
"""
from __future__ import annotations

import os.path as osp
import pickle
from typing import Any, Callable, List, Tuple, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

from karat.checkpoint import check_intact

# The methods HistoryBuffer registers as its default statistics (``_set_default_statistics``).
HISTORY_BUFFER_METHODS = ("min", "max", "current", "mean")


def history_buffer_method(owner: Any, name: str) -> Callable:
    """What ``getattr(HistoryBuffer, name)`` in an mmengine checkpoint may return: a statistics method."""
    if owner is not HistoryBuffer or name not in HISTORY_BUFFER_METHODS:
        raise pickle.UnpicklingError(
            f"Refused getattr({getattr(owner, '__qualname__', type(owner).__name__)}, {name!r}) in a checkpoint: "
            f"mmengine checkpoints only name HistoryBuffer's statistics methods {HISTORY_BUFFER_METHODS}.")
    return getattr(HistoryBuffer, name)


def mmengine_checkpoint_globals() -> List[Union[Any, Tuple[Any, str]]]:
    """What mmengine's own resume checkpoints need beyond tensors and containers, and nothing more."""
    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    # The buffers' arrays: float64 values, int64 counts (int32 where numpy < 2 on Windows made them).
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.int64, np.int32)]
    return [HistoryBuffer, (history_buffer_method, "builtins.getattr"), np.dtype, np.ndarray,
            multiarray._reconstruct, multiarray.scalar, *dtypes]


def load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's local loader, weights-only with mmengine's own checkpoint globals allowed."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    check_intact(filename)  # a truncated file is named as such, not as a weights-only refusal
    with torch.serialization.safe_globals(mmengine_checkpoint_globals()):
        return torch.load(filename, map_location=map_location, weights_only=True)


def install() -> None:
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5; older torch loads these files anyway
        CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)


install()
