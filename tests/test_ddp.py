"""DDP without unused parameters: a 2-process torchrun (gloo, CPU) trains ``classification.main`` for every KArAt
configuration with ``find_unused_parameters=False``, and the detectron2 / mmseg backbones go through their hosts' DDP
wrappers (``create_ddp_model``, ``MMDistributedDataParallel``). One torchrun runs every case (tests/ddp_driver.py):
starting Python, torch and timm twice per case would cost more than the cases themselves."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IN_CI
from ddp_driver import CASES

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = {"detectron2": "detectron2 KArAtViT", "mmseg": "mmseg KArAtVisionTransformer"}


@pytest.mark.slow
def test_ddp_training_steps_without_unused_parameters():
    # A missing host framework skips its backbone on a user's machine; under CI the driver's import fails the test.
    hosts = [h for h in BACKBONES if IN_CI or importlib.util.find_spec(h) is not None]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_driver.py"), "classification", *hosts]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    done = [line.removeprefix("DDP-OK ") for line in proc.stdout.splitlines() if line.startswith("DDP-OK ")]
    expected = [f"classification {c}" for c in CASES] + [BACKBONES[h] for h in hosts]
    assert done == expected, f"passed: {done}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, proc.stderr[-5000:]
