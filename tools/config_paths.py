"""A clear error for a mistyped config path: the path, the closest existing configs, and where to look.

Used by the launchers in ``tools/`` before they hand a path to detectron2's ``LazyConfig.load`` (whose own error
is a bare ``FileNotFoundError`` traceback).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Iterable, List, Sequence, Union

PathLike = Union[str, Path]
MAX_FILES = 2000  # candidates scanned: a mistyped path under a huge tree stays fast


def _files(folder: Path, suffix: str, recursive: bool) -> List[Path]:
    out: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")) and d != "node_modules")
        out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(suffix) and not f.startswith("_")]
        if not recursive or len(out) >= MAX_FILES:
            break
    return out[:MAX_FILES]


def _nearest_existing(path: Path) -> Path:
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder if folder.is_dir() else Path(".")


def missing_config_message(path: PathLike, roots: Sequence[PathLike] = (), what: str = "Config file") -> str:
    """``what path does not exist`` plus the closest configs in its nearest existing folder and under ``roots``."""
    path = Path(path)
    suffix = path.suffix or ".py"
    near = _nearest_existing(path)
    candidates = [] if near == Path(".") and roots else _files(near, suffix, recursive=near != Path("."))
    for root in roots:
        candidates += _files(Path(root), suffix, recursive=True)
    shown = sorted({os.path.relpath(c) for c in candidates})
    close = difflib.get_close_matches(os.path.normpath(str(path)), shown, n=5, cutoff=0.6)
    if not close:  # a mistyped name with a right folder: compare the file names alone
        by_name = {}
        for c in shown:
            by_name.setdefault(os.path.basename(c), c)
        close = [by_name[n] for n in difflib.get_close_matches(path.name, list(by_name), n=5, cutoff=0.6)]
    msg = f"{what} {path} does not exist."
    if close:
        return msg + " Did you mean:\n  " + "\n  ".join(close)
    if shown:
        more = f"\n  ... ({len(shown) - 10} more)" if len(shown) > 10 else ""
        return msg + f" Available {suffix} configs:\n  " + "\n  ".join(shown[:10]) + more
    return msg + f" No {suffix} files found near it ({near})."


def check_config_path(path: PathLike, roots: Iterable[PathLike] = (), what: str = "Config file") -> None:
    """Raise ``FileNotFoundError`` with :func:`missing_config_message` when ``path`` is not a file."""
    if not Path(path).is_file():
        raise FileNotFoundError(missing_config_message(path, tuple(roots), what))
