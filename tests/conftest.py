"""Shared test helpers.

Framework-dependent tests call :func:`require`: on a user's machine a missing framework skips the test,
but under CI (``CI=true``) it is a failure, so CI can never go green by silently skipping.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str) -> ModuleType:
    if IN_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
