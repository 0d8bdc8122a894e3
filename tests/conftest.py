"""Shared test helpers.

Framework-dependent tests call :func:`require`: on a user's machine a missing framework skips the test,
but under CI (``CI=true``) it is a failure, so CI can never go green by silently skipping.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str) -> ModuleType:
    if IN_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_grads_close(got, want) -> None:
    """``torch.autograd.grad(..., allow_unused=True)`` results of two paths agree: equal where the reference has a
    gradient; where it has none (an input the function does not use), the other path has none or only zeros."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w)


def lazyconfig_train(argv: list) -> None:
    """``tools/lazyconfig_train.py``'s entry point in this process (detectron2's launch() with one process)."""
    from tools import lazyconfig_train as launcher

    return launcher.invoke_main(argv)
