"""Checkpoints written atomically and read without executing pickled code."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, os.PathLike]


def save_checkpoint(obj: Any, path: PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` to a temporary file beside ``path``, then rename it into place,
    so an interrupted save never leaves a truncated checkpoint (or destroys the previous one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(..., weights_only=True)``: tensors, containers and plain values only, never code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist (or is not a file).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling error: the file holds objects, not just tensors
        raise ValueError(f"Could not load {path} safely as a weights-only checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). KArAt only loads checkpoints made of "
                         f"tensors and plain Python values.") from e
