"""The host's share of a fused-path training step stays small: the ops around the Triton kernels are counted.

At ViT-Tiny and ViT-Small widths a GPU step waits on the host (benchmarks/README.md, "Host cost per layer"), so
every op the fused path dispatches beside its kernels costs throughput there. The kernels themselves are replaced
by launch counters (``tools.host_ops``), which needs no GPU: what is counted is exactly what the host does.
"""
import pytest

from conftest import require_triton
from tools import host_ops


@pytest.fixture(autouse=True)
def _triton() -> None:
    require_triton()


# The fused layer's launching ops beyond timm's softmax layer (its SDPA forward and backward), forward + backward:
# the coefficient scaling (1), the rank expansion and its gradients (2 + 4, one sum), the coefficient gradients
# (2 products, one sum), the kernels' output buffers (4) and the output's layout for timm (1): 16 - 2 = 14 today.
# Adding an op here costs every layer of every step on the GPU.
EXTRA_OPS_BUDGET = 14


def test_fused_layer_dispatches_few_ops_beside_its_three_kernels():
    soft = host_ops.measure("softmax", tokens=65, repeat=1)
    fused = host_ops.measure("fused", tokens=65, repeat=1)  # > 64 keys: the flash-style kernels
    assert fused["stubbed"] and fused["triton"] == 3  # forward, dq, dk: one launch each
    extra = fused["forward_ops"] + fused["backward_ops"] - soft["forward_ops"] - soft["backward_ops"]
    assert extra <= EXTRA_OPS_BUDGET, (extra, fused["ops"], soft["ops"])
    # q, k and v are read in place (strided slices of the fused qkv): the one copy beyond softmax's is timm's
    # transpose-reshape of the (B, H, N, d) output, which SDPA hands back already laid out (B, N, H, d)
    assert fused["ops"].get("clone", 0) <= soft["ops"].get("clone", 0) + 1, fused["ops"]
    assert "copy_" not in fused["ops"] and "contiguous" not in fused["ops"], fused["ops"]

def test_whole_window_layer_dispatches_no_more_ops_than_the_flash_kernels():
    """At most 64 keys (N = 16 here) the whole-window kernels serve: two launches (forward, backward), the rank
    expansion inside them, and no more ops beside them than the flash-style path."""
    soft = host_ops.measure("softmax", repeat=1)
    window = host_ops.measure("fused", repeat=1)
    assert window["stubbed"] and window["triton"] == 2
    extra = window["forward_ops"] + window["backward_ops"] - soft["forward_ops"] - soft["backward_ops"]
    assert extra <= EXTRA_OPS_BUDGET, (extra, window["ops"], soft["ops"])
    assert "copy_" not in window["ops"] and "contiguous" not in window["ops"], window["ops"]


def test_stubs_are_removed_afterwards_and_the_tool_prints_its_table(capsys):
    from karat.kernels import fused_triton, fused_window

    kernels = [getattr(m, name) for m in (fused_triton, fused_window) for name in m.KERNELS]
    assert host_ops.main(["--paths", "softmax", "fused", "--repeat", "2"]) == 0
    assert [getattr(m, name) for m in (fused_triton, fused_window) for name in m.KERNELS] == kernels
    out = capsys.readouterr().out
    assert "| softmax | " in out and "| fused (kernels stubbed) | " in out
