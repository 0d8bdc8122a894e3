"""The rules of tests/conftest.py.

* What a test needs (a framework, our C++ CPU kernel, Triton for our fused kernels) skips the test with the reason
  where it is missing, and fails it under CI (``CI=true``), so a broken kernel build turns CI red instead of every
  "efficient" test quietly running the PyTorch path.
* A test starts from the mmengine default scope the one before it found, whatever scope that one left current.
* Tests run offline in the test process, so none passes or fails by whether the machine has a network.
"""
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
from conftest import require, require_cpu_kernel, require_triton
from karat.kernels import fused_cpu

ROOT = Path(__file__).resolve().parents[1]

# Run with tests/conftest.py as a plugin (its autouse fixtures included), CI=true and the C++ kernel disabled.
CHECKS = """
import sys

from conftest import leave_default_scope, require, require_cpu_kernel, require_triton


def test_cpu_kernel():
    require_cpu_kernel()


def test_triton():
    sys.modules["triton"] = None  # importing it now fails, as where it is not installed
    require_triton()


def test_framework():
    require("karat_no_such_framework")


def test_a_runner_leaves_its_scope():
    require("mmengine")
    leave_default_scope("mmdet")


def test_the_next_test_starts_without_it():
    from mmengine.registry import DefaultScope

    assert DefaultScope.get_current_instance() is None
"""


def test_under_ci_a_missing_dependency_fails_with_its_reason(tmp_path):
    (tmp_path / "test_checks.py").write_text(CHECKS)
    env = dict(os.environ, CI="true", KARAT_CPU_KERNEL="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "test_checks.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "3 failed, 2 passed" in out, out[-3000:]
    for reason in ("disabled by KARAT_CPU_KERNEL=0", "Triton is not installed", "'karat_no_such_framework'"):
        assert reason in out, out[-3000:]


@pytest.fixture
def outside_ci(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", False)
    monkeypatch.setattr(fused_cpu, "_state", {})  # built afresh, then the real state is put back


def _reason(check, outcome) -> str:
    with pytest.raises(outcome) as e:
        check()
    return e.value.msg


def test_outside_ci_a_disabled_kernel_or_missing_triton_skips_and_says_why(outside_ci, monkeypatch):
    monkeypatch.setenv("KARAT_CPU_KERNEL", "0")
    assert "C++ CPU kernel" in _reason(require_cpu_kernel, pytest.skip.Exception)
    assert "disabled by KARAT_CPU_KERNEL=0" in _reason(require_cpu_kernel, pytest.skip.Exception)
    monkeypatch.setitem(sys.modules, "triton", None)
    assert "Triton is not installed" in _reason(require_triton, pytest.skip.Exception)
    framework = _reason(lambda: require("karat_no_such_framework"), pytest.skip.Exception)
    assert "could not import 'karat_no_such_framework'" in framework


def test_a_failed_build_keeps_its_whole_error_for_the_test_report(outside_ci, monkeypatch):
    error = ("Error building extension 'karat_fourier_cpu':\n"
             "fourier_cpu.cpp:12:3: error: expected ';' before '}' token\nninja: build stopped")

    def broken():
        raise RuntimeError(error)

    monkeypatch.delenv("KARAT_CPU_KERNEL", raising=False)
    monkeypatch.setattr(fused_cpu, "_build", broken)
    with pytest.warns(UserWarning, match="ninja: build stopped"):  # users get the last line, once
        assert not fused_cpu.available()
    assert fused_cpu.unavailable_reason() == f"RuntimeError: {error}"
    assert error in _reason(require_cpu_kernel, pytest.skip.Exception)
    monkeypatch.setattr(conftest, "IN_CI", True)
    failure = _reason(require_cpu_kernel, pytest.fail.Exception)
    assert error in failure and "CI=true" in failure


def test_tests_run_offline_but_this_machine_stays_reachable():
    with pytest.raises(OSError, match="the tests run offline") as e:
        socket.create_connection(("192.0.2.1", 443), timeout=1)  # TEST-NET-1: never a real host
    assert e.value.errno == errno.ENETUNREACH
    with socket.socket() as probe:
        assert probe.connect_ex(("192.0.2.1", 443)) == errno.ENETUNREACH
    with socket.socket() as server:  # loopback, as DDP's rendezvous and local servers use it
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
