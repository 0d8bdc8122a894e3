"""Checkpoints written atomically and read without executing pickled code.

A file that cannot be read is reported as what it is: "corrupt or truncated" (a copy or save that did not
finish) or "refused" (it holds pickled objects besides tensors), so a user knows whether to copy it again
or to distrust it.
"""
from __future__ import annotations

import os
import pickle
import re
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

PathLike = Union[str, os.PathLike]


class CorruptCheckpointError(ValueError):
    """The file ends early or its bytes are damaged (an interrupted save or copy)."""


def save_checkpoint(obj: Any, path: PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` to a temporary file beside ``path``, then rename it into place,
    so an interrupted save never leaves a truncated checkpoint (or destroys the previous one). Temporaries a
    killed save left behind are removed after the next successful one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if _left_by_dead_writer(stale, path.name):
            try:
                stale.unlink()
            except OSError:
                pass
    return path


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _left_by_dead_writer(tmp: Path, name: str) -> bool:
    """Whether a temporary ``.<name>.<host>.<pid>.<random>.tmp`` was left by a save whose process is gone.
    Only this host's processes can be checked; another host's (a shared filesystem) are left alone."""
    parts = tmp.name[len(name) + 2:-len(".tmp")].split(".")
    if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False  # a save of this process still under way (another thread)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _zip_damage(path: Path) -> Optional[str]:
    """What is wrong with a ``torch.save`` (zip) file's structure, or None when it is sound."""
    if path.stat().st_size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            return None  # not torch's zip format (legacy pickle): judged by the loader's error
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"its zip structure is unreadable: {e}"
    return f"{bad} fails its CRC check" if bad else None


def check_intact(path: PathLike) -> None:
    """Raise :class:`CorruptCheckpointError` when a ``torch.save`` file is empty or its zip structure is damaged
    (for loaders other than :func:`load_checkpoint`, e.g. mmengine's)."""
    damage = _zip_damage(Path(path))
    if damage:
        raise _corrupt(Path(path), damage)


def _corrupt(path: Path, detail: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"Checkpoint {path} is corrupt or truncated ({detail}): the save or copy that "
                                  f"wrote it did not finish. Copy or save it again.")


def load_safetensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """A ``.safetensors`` file (tensors only by design); a damaged one is reported as corrupt or truncated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(..., weights_only=True)``: tensors, containers and plain values only, never code
    (``.safetensors`` files are read with safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist (or is not a file).")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    check_intact(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        message = " ".join(str(e).split())
        refused = (isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in message
                   and not any(w in message for w in ("truncated", "EOF", "exhausted", "unpack requires")))
        if not refused:  # the file ends early or its bytes are damaged
            raise _corrupt(path, f"{type(e).__name__}: {first[:200]}") from e
        reason = next((line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), first)
        raise ValueError(f"Refused to load {path} as a weights-only checkpoint: it holds pickled objects, not just "
                         f"tensors and plain values ({reason.strip()[:300]}). KArAt never unpickles code; re-save "
                         f"the weights as a state dict of tensors.") from e
