"""Fetch timm's own test suite (``tests/`` of the installed timm version's source distribution) into a cache.

``tools/setup_env.sh`` runs this once per environment, so that ``tests/test_timm_suite.py`` reads timm's tests from
the cache and never needs a network. Nothing is copied into this repository.

    python -m tools.timm_sdist            # -> ~/.cache/karat/timm-sdist/timm-<version>/
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional


def cache_dir() -> Path:
    """``$KARAT_CACHE``, else ``$XDG_CACHE_HOME/karat``, else ``~/.cache/karat`` (as tools/setup_env.sh)."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("KARAT_CACHE", xdg / "karat")) / "timm-sdist"


def cached(version: str) -> Optional[Path]:
    """The extracted ``timm-<version>/`` folder holding ``tests/`` and timm's pytest config, if fetched."""
    root = cache_dir() / f"timm-{version}"
    return root if (root / "tests" / "test_models.py").is_file() else None


def fetch(version: str) -> Path:
    """Download the sdist with pip and keep its ``tests/`` and ``pyproject.toml`` (once; then from the cache)."""
    done = cached(version)
    if done is not None:
        return done
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"timm=={version}",
               "-d", tmp, "--disable-pip-version-check", "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        archives = list(Path(tmp).glob(f"timm-{version}.tar.gz"))
        if proc.returncode or not archives:
            raise RuntimeError(f"could not download timm {version}'s source distribution: {proc.stderr[-1500:]}")
        with tarfile.open(archives[0]) as tar:
            wanted = [m for m in tar.getmembers()
                      if m.name.startswith(f"timm-{version}/tests/") or m.name == f"timm-{version}/pyproject.toml"]
            tar.extractall(tmp, members=wanted, filter="data")
        root = cache / f"timm-{version}"
        os.replace(Path(tmp) / f"timm-{version}", root)  # atomic: a half-extracted folder is never reused
    return root


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=None, help="timm version (default: the installed one)")
    args = parser.parse_args(argv)
    if args.version is None:
        import timm

        args.version = timm.__version__
    print(fetch(args.version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
