"""Tracing the fused Triton paths on a machine without a GPU: fake CUDA tensors, nothing runs.

On such a machine Dynamo does not recognise Triton kernels (``torch.utils._triton.has_triton()`` asks the CUDA
driver), and torch reads which arguments a kernel writes from its Triton IR, which Triton generates for a target it
asks its driver for. :func:`pretend_h100` answers both (an sm_90 target, as ``tests/test_fused_compile.py`` compiles
for); :func:`graph_ops` names what a traced graph calls, Triton kernels by their names. Scripts run by
:func:`run_script` (a fresh process, the real compiler rather than the interpreter) import this module."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Set

TESTS = Path(__file__).resolve().parent


def pretend_h100() -> None:
    """Make torch and Triton act as if an H100 were present (for tracing with fake CUDA tensors only)."""
    import torch.utils._triton
    import triton
    from triton.backends.compiler import GPUTarget

    class H100:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    torch.utils._triton.has_triton = lambda: True
    triton.runtime.driver.set_active(H100())


def graph_ops(gm) -> Set[str]:
    """The functions an FX graph calls; a Triton launch (``triton_kernel_wrapper_*``) by its kernel's name."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    names = set()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = str(node.target)
            if "triton_kernel_wrapper" in name:
                name = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
            names.add(name)
    return names


def run_script(source: str, timeout: int = 600) -> Dict[str, Any]:
    """Run ``source`` in a fresh process (the repository and this folder importable, ``TRITON_INTERPRET`` unset) and
    return the JSON object its last line of output prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", source], cwd=TESTS.parent, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
