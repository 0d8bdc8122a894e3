"""Run a multi-process command (torchrun and its workers) so that a hang fails with every process's Python stack.

``subprocess.run(timeout=...)`` kills only the launcher, with SIGKILL, and the test then says nothing about where a
rank waited; torchrun's workers live in process groups of their own and outlive it. Here the command runs with
``PYTHONFAULTHANDLER=1``; past the timeout the launcher and all its descendants get SIGABRT (Python's fault handler
prints each process's threads to stderr), then SIGKILL."""
from __future__ import annotations

import signal
import subprocess
from typing import Dict, List, Tuple

import psutil


def _signal_tree(pid: int, sig: int) -> None:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def finish(proc: subprocess.Popen, timeout: float) -> Tuple[str, str]:
    """``proc.communicate(timeout=timeout)``; past it, AssertionError with every process's stacks. Nothing of the
    tree outlives the call."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_tree(proc.pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_tree(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, proc.args[:6]))} ... did not finish in {timeout:g} s; its "
                             f"processes' stacks:\n{(err or '')[-12000:]}\n--- stdout ---\n{(out or '')[-12000:]}") \
            from None
    finally:
        _signal_tree(proc.pid, signal.SIGKILL)  # e.g. a worker orphaned by a launcher that crashed
    return out, err


def popen(cmd: List[str], *, env: Dict[str, str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` (text mode) with Python's fault handler on in every process it starts."""
    return subprocess.Popen(cmd, env={**env, "PYTHONFAULTHANDLER": "1"}, text=True, **kwargs)


def run(cmd: List[str], *, timeout: float, env: Dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)``; raises AssertionError with the stacks on a hang."""
    proc = popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    out, err = finish(proc, timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
