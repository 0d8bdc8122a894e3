"""Proof that a test ran the fused C++ CPU kernel, not the reference path (spec section 5).

At the small sizes most tests use, ``impl="auto"`` materialises sigma(S) (``karat.kernels.REFERENCE_MAX_TOKENS``);
users' models are larger and run the C++ kernel. Tests of that path count the kernel's calls with
:func:`cpu_kernel_calls`, so a change of dispatch cannot make them pass on the reference path unnoticed. Also
used inside the torchrun drivers (``tests/ddp_driver.py``), which report the counts back on stdout.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn

from karat.kernels import REFERENCE_MAX_TOKENS, fused_cpu

# The fewest keys for which ``auto`` takes the C++ kernel on the CPU.
CPU_KERNEL_MIN_TOKENS = REFERENCE_MAX_TOKENS["C++ CPU kernel"] + 1


@contextmanager
def cpu_kernel_calls() -> Iterator[Counter]:
    """Counts ``karat::fourier_reduce`` (``"forward"``) and ``karat::fourier_reduce_backward`` (``"backward"``)
    calls made inside the block, on any thread."""
    calls: Counter = Counter()
    forward, backward = fused_cpu.fourier_reduce, fused_cpu.fourier_reduce_backward

    def counted_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counted_backward(*args, **kwargs):
        calls["backward"] += 1
        return backward(*args, **kwargs)

    fused_cpu.fourier_reduce, fused_cpu.fourier_reduce_backward = counted_forward, counted_backward
    try:
        yield calls
    finally:
        fused_cpu.fourier_reduce, fused_cpu.fourier_reduce_backward = forward, backward


def assert_kernel_path_matches_reference(build: Callable[[str], nn.Module],
                                         run: Callable[[nn.Module], torch.Tensor]) -> Counter:
    """``build(impl)`` twice, with the default ``impl="auto"`` and with ``"reference"`` (sigma(S) materialised), in
    float64 and with the same weights; ``run(model)`` forward and backward in each. Asserts that the C++ kernel
    served ``auto`` in forward and backward and that the outputs and every parameter's gradient agree: a host mask
    the kernel applied differently from the reference (a masked key read, a visible one dropped) fails here."""
    from conftest import require_cpu_kernel  # not at import: torchrun drivers import this module outside pytest

    require_cpu_kernel()
    auto, reference = build("auto").double(), build("reference").double()
    reference.load_state_dict(auto.state_dict())
    auto.eval()  # mmengine modules' train() returns None: not chained
    reference.eval()
    with cpu_kernel_calls() as calls:
        got = run(auto)
        got.square().sum().backward()
    assert min(calls["forward"], calls["backward"]) > 0, f"the C++ kernel did not serve impl='auto': {dict(calls)}"
    want = run(reference)
    want.square().sum().backward()
    torch.testing.assert_close(got, want)
    for (name, p), q in zip(auto.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    return calls
