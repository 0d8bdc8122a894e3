"""Shared test helpers, and the rules every test runs under (tests/test_conftest.py checks them).

* Tests that need something optional say so with :func:`require` (a framework), :func:`require_cpu_kernel` (our
  C++ CPU kernel) or :func:`require_triton` (Triton, for our fused kernels): on a user's machine its absence skips
  the test with the reason, but under CI (``CI=true``) it is a failure, so CI can never go green by silently
  skipping.
* Tests run offline in this process (only this machine is reachable), so none passes or fails by whether the
  machine has a network.
* mmengine's default scope is put back after each test; registry builds still name their scope.
"""
from __future__ import annotations

import errno
import functools
import importlib
import itertools
import os
import socket
import sys
from collections import OrderedDict
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, NoReturn

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_LEFT = itertools.count()  # names of the default scopes tests leave current on purpose


def missing_dependency(reason: str) -> NoReturn:
    """Skip (with ``reason``) where something a test needs is absent; under CI, fail with it instead. Works at
    module level too."""
    if IN_CI:
        pytest.fail(f"{reason}\n(CI=true: what a test needs must be present; outside CI this test is skipped)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str) -> ModuleType:
    """``module``, imported; absent, the test skips (fails under CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing_dependency(f"could not import {module!r}: {exc}")


def require_cpu_kernel() -> None:
    """The fused C++ CPU kernel, built now (or taken from its cache); its build error is the reason."""
    from karat.kernels import fused_cpu

    reason = fused_cpu.unavailable_reason()
    if reason is not None:
        missing_dependency(f"the fused C++ CPU kernel (karat/kernels/fused_cpu.py) is not available: "
                           f"{reason[-3000:]}")


def require_triton() -> ModuleType:
    """Triton, which runs our fused kernels (on the CPU through ``TRITON_INTERPRET=1``); torch's CUDA wheels bring
    it."""
    try:
        return importlib.import_module("triton")
    except ImportError as exc:
        missing_dependency(f"Triton is not installed ({exc}), so the fused Triton kernels "
                           f"(karat/kernels/fused_triton.py) cannot be tested: install torch's CUDA wheel or "
                           f"`pip install triton`")


LOOPBACK = ("localhost", "::1", "::", "0.0.0.0")


def _is_this_machine(host: object) -> bool:
    return str(host) in LOOPBACK or str(host).startswith("127.") or str(host) == socket.gethostname()


def _offline(connect: Callable, returns_errno: bool = False) -> Callable:
    """``socket.connect`` (``connect_ex``: ``returns_errno``) that refuses hosts other than this machine, as a
    machine without a network does."""
    @functools.wraps(connect)
    def guarded(sock: socket.socket, address: Any, *args: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_this_machine(address[0]):
            if returns_errno:
                return errno.ENETUNREACH
            raise OSError(errno.ENETUNREACH, f"Network is unreachable: the tests run offline (tests/conftest.py), "
                                             f"so no test depends on whether this machine has a network; "
                                             f"connecting to {address!r} was refused")
        return connect(sock, address, *args)

    return guarded


@pytest.fixture(autouse=True, scope="session")
def _no_network() -> Iterator[None]:
    """In this process every test runs as on a machine without a network (loopback stays open: DDP's rendezvous,
    local servers): a download a test did not mean to make fails alike everywhere, instead of passing only offline.
    Subprocesses are not covered; none of them downloads (timm's own test suite comes from the environment build's
    cache, tools/timm_sdist.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _offline(socket.socket.connect))
        mp.setattr(socket.socket, "connect_ex", _offline(socket.socket.connect_ex, returns_errno=True))
        yield


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_default_scope() -> Iterator[None]:
    """A safety net: mmengine's current default scope is put back after each test (a runner, or
    ``init_default_scope``, leaves its own current for the rest of the process). Builds still name their scope
    (``DefaultScope.overwrite_default_scope``, a config's ``default_scope``), so they hold in any order."""
    before = _default_scopes()
    yield
    registry = sys.modules.get("mmengine.registry")
    if registry is not None:
        registry.DefaultScope._instance_dict = before


def _default_scopes() -> "OrderedDict[str, Any]":
    registry = sys.modules.get("mmengine.registry")  # not imported: no scope yet (and none imported here)
    return OrderedDict() if registry is None else registry.DefaultScope._instance_dict.copy()


@pytest.fixture(scope="module")
def mmseg_backbones() -> Iterator[ModuleType]:
    """``mmseg_configs.backbones`` (our mmseg/mmdet registrations), with the module's tests run in mmseg's default
    scope, as mmseg's tools run (``init_default_scope('mmseg')``): registry builds that name no scope (mmcv's bricks
    inside mmseg's ViT and Swin: norms, activations, drop path, initialisers) then resolve against mmseg's registry,
    whatever runner an earlier test left behind ('mmengine', 'mmdet')."""
    require("mmseg")
    require("mmdet")
    from mmengine.registry import DefaultScope
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    import mmseg_configs.backbones as backbones

    with DefaultScope.overwrite_default_scope("mmseg"):
        yield backbones


def leave_default_scope(scope: str) -> None:
    """Make ``scope`` mmengine's current default scope, as a runner of that scope built earlier leaves it."""
    from mmengine.registry import DefaultScope

    DefaultScope.get_instance(f"left-by-an-earlier-test-{next(_LEFT)}", scope_name=scope)


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
