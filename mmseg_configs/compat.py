"""Resuming mmengine 0.10 runs under torch >= 2.6, where ``torch.load`` reads weights only by default.

mmengine's resume checkpoints hold its ``MessageHub`` state: ``HistoryBuffer`` objects (which pickle their
statistics methods through ``getattr``) and numpy arrays. torch >= 2.6 refuses those, so ``tools/train.py
--resume`` fails with an ``UnpicklingError``. This module replaces mmengine's local-file checkpoint loader
with one that still loads weights-only but allows exactly those globals, and only while mmengine loads a
checkpoint (``load_from``, ``--resume``, ``init_cfg``); every other ``torch.load`` is left as it was.
"""
from __future__ import annotations

import os.path as osp
from typing import Any, List

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader


def mmengine_checkpoint_globals() -> List[Any]:
    """What mmengine's own resume checkpoints need beyond tensors and containers."""
    multiarray = getattr(np, "_core", None) or np.core
    return [HistoryBuffer, getattr, np.dtype, np.ndarray, multiarray.multiarray._reconstruct,
            multiarray.multiarray.scalar] + [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32)]


def load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's local loader, weights-only with mmengine's own checkpoint globals allowed."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    with torch.serialization.safe_globals(mmengine_checkpoint_globals()):
        return torch.load(filename, map_location=map_location, weights_only=True)


def install() -> None:
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5; older torch loads these files anyway
        CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)


install()
