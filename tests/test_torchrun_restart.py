"""A preempted worker under ``torchrun --max-restarts 1 ... --resume auto``: the group restarts, initialises and
finishes with the weights of a run nobody killed, on the default path (64 patch tokens: the C++ kernel on a CPU).

torchrun keeps one TCPStore across restarts; before ``karat-env://`` the restarted workers read the killed ones'
addresses from it and failed or hung in two runs of three (karat/distributed.py). The kill lands at a random point
after the first checkpoint, as a preemption would; run this file repeatedly when touching process-group code.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import process_group
from conftest import require_cpu_kernel
from karat import KArAtConfig, KArAtCore, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Patch 1 on the 8 px digits: 64 patch tokens + the class token, past the C++ kernel's crossover (24 keys).
ARGS = ["--data-set", "DIGITS", "--input-size", "8", "--model", "vit_tiny_patch16_224_karat", "--model-kwargs",
        "patch_size=1", "in_chans=1", "embed_dim=16", "depth=1", "num_heads=2", "--grid", "2", "--hidden_dim", "4",
        "--batch-size", "16", "--epochs", "4", "--num_workers", "0", "--device", "cpu",
        "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "", "--amp", "false",
        "--sched", "step", "--decay-epochs", "100", "--resume", "auto", "--dist-init-timeout", "120"]


def _torchrun(out: Path, restarts: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "-m", "classification.main", *ARGS, "--output_dir", str(out)]
    return process_group.popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _worker(agent: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no worker with RANK={rank} under torchrun")


def _finish(agent: subprocess.Popen) -> str:
    out, _ = process_group.finish(agent, timeout=420)  # a hung group fails with every process's stacks
    assert agent.returncode == 0, out[-4000:]
    return out


def test_the_run_takes_the_cpu_kernel():
    require_cpu_kernel()  # without it the restart test would run the PyTorch path instead of the default one
    q = torch.randn(2, 2, 65, 8)
    assert KArAtCore(2, 65, KArAtConfig()).choose_path(q).detail == "C++ CPU kernel"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    _finish(_torchrun(out, restarts=0))
    return load_checkpoint(out / "checkpoint.pth")


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["rank1-killed", "rank0-killed"])
def test_a_killed_worker_restarts_and_ends_bit_identical(victim, uninterrupted, tmp_path):
    agent = _torchrun(tmp_path, restarts=1)
    first = tmp_path / "checkpoint.pth"
    deadline = time.monotonic() + 300
    while not first.exists():  # the first checkpoint; the kill then lands wherever training is
        if agent.poll() is not None or time.monotonic() > deadline:
            out, _ = process_group.finish(agent, timeout=0)  # one that still runs fails here, with its stacks
            raise AssertionError(f"no first checkpoint\n{out[-4000:]}")
        time.sleep(0.05)
    time.sleep(float(torch.rand(()) * 2.0))  # an epoch takes about a second
    os.kill(_worker(agent, victim).pid, signal.SIGKILL)
    log = _finish(agent)
    assert "restart" in log.lower() or "resumed from" in log, log[-4000:]
    got = load_checkpoint(first)
    assert got["epoch"] == uninterrupted["epoch"] == 3
    for name, want in uninterrupted["model"].items():
        assert torch.equal(got["model"][name], want), f"{name} differs from the uninterrupted run"
