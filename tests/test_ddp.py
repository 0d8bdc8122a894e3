"""DDP without unused parameters: a 2-process torchrun (gloo, CPU) trains ``classification.main`` for every KArAt
configuration with ``find_unused_parameters=False``, and the detectron2 / mmseg backbones go through their hosts' DDP
wrappers (``create_ddp_model``, ``MMDistributedDataParallel``). One torchrun runs every case (tests/ddp_driver.py):
starting Python, torch and timm twice per case would cost more than the cases themselves.

Every case runs at two sizes: the small one, where ``impl="auto"`` materialises sigma(S), and one above
``karat.kernels.REFERENCE_MAX_TOKENS``, where ``auto`` takes the C++ CPU kernel, as it does at the sizes users run;
the driver counts the kernel's calls, so those cases cannot pass on the reference path."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IN_CI, require_cpu_kernel
from ddp_driver import CASES, KERNEL_SUFFIX, WITHOUT_CPU_KERNEL, parse_reports

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
    done = parse_reports(proc.stdout)
    expected = [f"classification {c}" for c in CASES]
    expected += [BACKBONES[h] + suffix for h in hosts for suffix in ("", KERNEL_SUFFIX)]
    assert list(done) == expected, f"passed: {list(done)}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, proc.stderr[-5000:]

    require_cpu_kernel()  # the cases passed; without the kernel (no compiler) they ran on the PyTorch path
    on_kernel = [c for c in done if c.endswith(KERNEL_SUFFIX) and c.removeprefix("classification ")
                 not in WITHOUT_CPU_KERNEL]
    assert len(on_kernel) == len(CASES) // 2 - len(WITHOUT_CPU_KERNEL) + len(hosts)
    missed = {c: done[c] for c in on_kernel if min(done[c]) == 0}  # forward and backward both on the kernel
    assert not missed, f"the C++ kernel did not serve (forward, backward calls): {missed}"
