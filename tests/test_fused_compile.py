"""Every fused-kernel variant compiles for the GPUs users train on (A100, sm_80; H100, sm_90) on this CPU-only
machine, with Triton's bundled ptxas: a compile error or a program over the block's shared memory shows up in
CI instead of on a user's cluster. (The interpreter tests check the arithmetic; this checks the build.)"""
import os
import subprocess
import sys

import pytest

from conftest import require_triton

# (head_dim, G, r, q/k dtype, flags): the plain ViT kernel; every flag at once (bias, decomposed rel-pos, mask,
# SiLU base: each adds code, none removes any); the largest program (head_dim 256, G = 16) with every flag; cubic
# B-splines with every flag.
VARIANTS = [
    (64, 3, 12, "fp32", {}),
    (64, 3, 12, "bf16", dict(bias=True, relpos=True, mask=True, base=True)),
    (256, 16, 16, "fp16", dict(bias=True, relpos=True, mask=True, base=True)),
    (64, 5, 12, "bf16", dict(spline=3, bias=True, relpos=True, mask=True, base=True)),
]

SCRIPT = """
import json, sys
from karat.kernels import fused_triton
arch, d, g, r, dtype, flags = json.loads(sys.argv[1])
print(json.dumps(fused_triton.compile_offline(arch, d, g, r, dtype, **flags)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("variant", VARIANTS, ids=["plain", "all-flags", "d256-g16-all-flags", "bspline-all-flags"])
def test_every_kernel_variant_compiles_for_the_gpu(arch, variant):
    require_triton()
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([arch, *variant])], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(shared) == sorted(["_phi_fwd_kernel", "_phi_bwd_dq_kernel", "_phi_bwd_dk_kernel"])
    assert all(0 < v <= (166912 if arch == 80 else 232448) for v in shared.values()), shared


# The whole-window kernels (karat.kernels.fused_window, windows of <= 64 keys): the plain Fourier kernel at the
# largest window; B-splines with every flag (bias, mask, SiLU base); Swin-T's window attention (49 keys, head_dim
# 32, G = 3, r = 12, bf16 under autocast, the bias table and the shifted-window mask).
WINDOW_VARIANTS = [
    (64, 3, 12, "fp32", dict(tokens=64)),
    (64, 5, 12, "bf16", dict(spline=3, bias=True, mask=True, base=True, tokens=64)),
    (32, 3, 12, "bf16", dict(bias=True, mask=True, tokens=49)),
]

WINDOW_SCRIPT = """
import json, sys
from karat.kernels import fused_window
arch, d, g, r, dtype, flags = json.loads(sys.argv[1])
print(json.dumps(fused_window.compile_offline(arch, d, g, r, dtype, **flags)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("variant", WINDOW_VARIANTS, ids=["plain-n64", "bspline-all-flags-n64", "swin-t-bf16"])
def test_every_window_kernel_variant_compiles_for_the_gpu(arch, variant):
    require_triton()
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", WINDOW_SCRIPT, json.dumps([arch, *variant])], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(shared) == ["_window_bwd_kernel", "_window_fwd_kernel"]
    assert all(0 < v <= (166912 if arch == 80 else 232448) for v in shared.values()), shared
