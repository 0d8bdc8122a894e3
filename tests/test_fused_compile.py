"""Every shipped fused-kernel variant compiles for the GPUs users train on (A100, sm_80; H100, sm_90) on this
CPU-only machine, with Triton's bundled ptxas: a compile error, a program over the block's shared memory or a
kernel that spills registers shows up in CI instead of on a user's cluster. (The interpreter tests check the
arithmetic; this checks the build. ``python -m tools.kernel_table`` writes the same compiles' full table.)"""
import os
import subprocess
import sys

import pytest

from conftest import require_triton

try:
    from karat.kernels import fused_triton, fused_window
    # every shipped variant of both kernel families: (module, variant)
    VARIANTS = [(m, v) for m in (fused_triton, fused_window) for v in m.SHIPPED_VARIANTS]
except ImportError:  # pragma: no cover - torch missing: the test skips below
    VARIANTS = []

SCRIPT = """
import json, sys
from importlib import import_module
from karat.kernels import offline
module, arch, d, g, r, dtype, flags = json.loads(sys.argv[1])
print(json.dumps(offline.stats_of(import_module(module).compile_offline, arch, d, g, r, dtype, **flags)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("module, variant", VARIANTS, ids=[f"{m.__name__.rsplit('.', 1)[-1]}-{v}" for m, v in VARIANTS])
def test_every_kernel_variant_compiles_for_the_gpu_without_spills(arch, module, variant):
    require_triton()
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([module.__name__, arch,
                                                                     *module.SHIPPED_VARIANTS[variant]])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(s["kernel"] for s in stats) == sorted(module.KERNELS)
    limit = 166912 if arch == 80 else 232448
    for s in stats:
        assert 0 < s["shared"] <= limit, s
        # the module's SPILL_BUDGET says why any is > 0
        budget = module.SPILL_BUDGET.get((variant, s["kernel"], s["arch"]),
                                         module.SPILL_BUDGET.get((variant, s["kernel"]), 0))
        assert s["registers"] <= 255 and s["spill_stores"] <= budget and s["spill_loads"] <= budget, \
            f"{s['kernel']} spills on sm_{arch}: {s['spill_stores']} / {s['spill_loads']} bytes stored / loaded " \
            f"(budget {budget}): see `python -m tools.kernel_table`"
        assert s["per_logit"]["mma"] > 0, s  # the coefficient products run on tensor cores


def test_launch_configurations_come_from_the_tuning_space_by_key(monkeypatch):
    """The launch configuration is the first of the tuning space (deterministic: the interpreter and a GPU
    without a tuning run take it) unless one was tuned for the key, which holds per N bucket."""
    require_triton()
    import torch

    from karat.kernels import fused_triton as fused

    plain = fused.launch_config("_phi_fwd_kernel", 64, 6, 12, torch.float32, 197, {"HAS_BIAS": False})
    assert plain == fused.config_space("_phi_fwd_kernel", 64, 6, 12, "fp32")[0]
    assert plain != fused.launch_config("_phi_fwd_kernel", 256, 33, 16, torch.float16, 197)  # a larger program
    key = ("_phi_fwd_kernel", 64, 6, 16, "bf16", ("HAS_MASK",), fused.n_bucket(197))
    tuned = dict(BM=16, BN=16, num_warps=2, num_stages=1)
    monkeypatch.setitem(fused._TUNED, key, tuned)
    assert fused.launch_config("_phi_fwd_kernel", 64, 6, 12, torch.bfloat16, 256, {"HAS_MASK": True}) == tuned
    assert fused.launch_config("_phi_fwd_kernel", 64, 6, 12, torch.bfloat16, 1025, {"HAS_MASK": True}) != tuned
    for configs in fused._SPACE.values():
        assert all(bm in (16, 32, 64) and bn in (16, 32, 64) and w in (2, 4, 8) for bm, bn, w, _ in configs)


def test_kernel_table_skips_a_module_that_is_not_there_and_renders_rows():
    """tools/kernel_table.py measures the modules of its registry that exist (another kernel module joins with one
    line) and renders one row per kernel."""
    from tools import kernel_table

    rows, notes = kernel_table.measure(["karat.kernels.no_such_kernels"], [90])
    assert rows == [] and "not measured" in notes[0]
    row = dict(module="fused_triton", variant="plain", head_dim=64, G=3, r=12, dtype="fp32", arch="sm_90",
               kernel="_phi_fwd_kernel", tile=[64, 32], num_warps=4, num_stages=2, registers=165, spill_stores=0,
               spill_loads=0, stack=0, shared=81920, per_logit=dict(mma=0.094, sincos=0.062, all=2.135))
    table = kernel_table.markdown([row], notes, "python -m tools.kernel_table")
    assert "| fused_triton: plain (d 64, G 3, r 12, fp32) | sm_90 | fwd | 64x32 | 4 | 2 | 165 | 0/0 |" in table


def test_window_launch_configurations_come_from_their_space_by_key(monkeypatch):
    """The whole-window kernels' configuration (query rows per block, warps) is the first of their space unless one
    was tuned for the key (head dim, G, rank, dtype, options, window size); small windows take 4 warps."""
    require_triton()
    import torch

    from karat.kernels import fused_window as window

    assert window.launch_config(32, 3, 12, torch.bfloat16, 64, {"HAS_BIAS": True}) == dict(BM=16, num_warps=8)
    assert window.config_space(16) == [dict(BM=16, num_warps=4)]  # 16 keys: one block, 4 warps
    tuned = dict(BM=32, num_warps=8)
    monkeypatch.setitem(window._TUNED, (32, 3, 16, "bf16", ("HAS_BIAS", "HAS_MASK"), 64), tuned)
    assert window.launch_config(32, 3, 12, torch.bfloat16, 64, {"HAS_BIAS": True, "HAS_MASK": True}) == tuned
    assert window.launch_config(32, 3, 12, torch.bfloat16, 64, {"HAS_BIAS": True}) != tuned  # another key
    assert tuned in window.config_space(64)
