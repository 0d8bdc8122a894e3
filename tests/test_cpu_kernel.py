"""The fused CPU kernel (karat/kernels/fused_cpu.py) computes the Fourier key reduction exactly, gradients included,
with the hosts' bias and masks, serves the efficient path, and its absence only costs speed."""
import warnings

import pytest
import torch

from conftest import assert_grads_close, require_cpu_kernel
from karat import KArAtConfig, KArAtCore
from karat.kernels import efficient, fused_cpu as cpu_kernel



@pytest.fixture
def kernel():
    """The kernel, built here (once, cached) rather than at collection: absent, the test skips with the build error
    (fails under CI)."""
    require_cpu_kernel()


needs_kernel = pytest.mark.usefixtures("kernel")


def _plain(q, k, coef, scale, grid):
    """The same function written the plain way: all features materialised, one einsum."""
    kx = (scale * q @ k.transpose(-1, -2)).unsqueeze(-1) * torch.arange(1, grid + 1, dtype=q.dtype)
    return torch.einsum("bhijm,hjmr->bhir", torch.cat([kx.cos(), kx.sin()], -1), coef)


@needs_kernel
@pytest.mark.parametrize("whole", [1 << 20, 0], ids=["logits-per-pair", "logits-per-tile"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_values_and_gradients_match_the_plain_formula(dtype, tol, whole, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "TILE_KEYS", 8)  # several key tiles, and a partial query tile (N = 37)
    monkeypatch.setattr(cpu_kernel, "WHOLE_PAIR_LOGITS", whole)
    b, h, n, nk, d, grid, r = 2, 3, 37, 21, 5, 3, 4
    q = torch.randn(b, h, n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, nk, d, dtype=dtype, requires_grad=True)
    coef = torch.randn(h, nk, 2 * grid, r, dtype=dtype, requires_grad=True)
    out = cpu_kernel.fourier_reduce(q, k, coef, 0.7, grid)
    want = _plain(q, k, coef, 0.7, grid)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol * want.abs().max().item())
    g = torch.randn_like(want)
    for got, ref in zip(torch.autograd.grad(out, (q, k, coef), g), torch.autograd.grad(want, (q, k, coef), g)):
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("span", [50.0, 1e6], ids=["polynomial", "large-logits"])
def test_sin_cos_are_accurate_over_the_whole_range(span):
    """One query per x against a single key 1 with identity coefficients: the outputs are the features of x
    (large logits take the library's sin/cos, the rest the vectorised polynomial)."""
    x = torch.linspace(-span, span, 4001)
    q, k, coef = x.view(1, 1, -1, 1), torch.ones(1, 1, 1, 1), torch.eye(6).view(1, 1, 6, 6)
    feats = cpu_kernel.fourier_reduce(q, k, coef, 1.0, 3)[0, 0].double()
    kx = x.double()[:, None] * torch.arange(1, 4, dtype=torch.float64)
    assert (feats - torch.cat([kx.cos(), kx.sin()], -1)).abs().max() < 1e-5


@needs_kernel
def test_opcheck_registration():
    """Schema, fake kernel and autograd registration, as torch.compile / torch.export / fx rely on them."""
    q, k = torch.randn(1, 2, 5, 3, requires_grad=True), torch.randn(1, 2, 6, 3, requires_grad=True)
    coef = torch.randn(2, 6, 4, 3, requires_grad=True)
    torch.library.opcheck(cpu_kernel.fourier_reduce, (q, k, coef, 0.5, 2))


def _cores(n=40):
    cfg = KArAtConfig(basis_type="FourierBasis", grid=3, hidden_dim=4, impl="reference")
    ref = KArAtCore(2, n, cfg)
    eff = KArAtCore(2, n, cfg.replace(impl="efficient"), operator_factory=lambda *_: ref.operator)
    return ref, eff


@needs_kernel
def test_efficient_path_runs_the_kernel_and_matches_the_reference():
    ref, eff = _cores()
    q, k, v = (torch.randn(2, 2, 40, 8, requires_grad=True) for _ in range(3))
    with torch.profiler.profile() as prof:
        out = eff(q, k, v)
        out.sum().backward()
    names = {e.name for e in prof.events()}
    assert "karat::fourier_reduce" in names and "karat::fourier_reduce_backward" in names
    torch.testing.assert_close(out, ref(q, k, v), rtol=1e-4, atol=1e-5)


def test_deterministic_algorithms_keep_the_pytorch_path():
    """The kernel's threads add coefficient gradients in finishing order; deterministic mode must not take it."""
    _, eff = _cores()
    q, k, v = (torch.randn(2, 2, 40, 8) for _ in range(3))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.profiler.profile() as prof:
            eff(q, k, v)
    finally:
        torch.use_deterministic_algorithms(was)
    assert "karat::fourier_reduce" not in {e.name for e in prof.events()}


def test_without_a_compiler_the_pytorch_path_serves_with_one_warning(monkeypatch):
    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.delenv("KARAT_CPU_KERNEL", raising=False)
    monkeypatch.setattr(cpu_kernel, "_build", broken)
    monkeypatch.setattr(cpu_kernel, "_state", {})
    ref, eff = _cores()
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    with pytest.warns(UserWarning, match="PyTorch path"):
        out = eff(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eff(q, k, v)  # no second warning
    torch.testing.assert_close(out, ref(q, k, v), rtol=1e-4, atol=1e-5)
    assert not efficient._fused_cpu(eff.operator.phi, q, k, None, None)


@needs_kernel
def test_two_threads_with_grad_enabled():
    """The tiles run on OpenMP workers, whose autograd state is not the caller's: inputs that require grad
    must not reach an ATen out= call there."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # 3 x 3 (batch, head) pairs over two threads: one head's pairs are split between them
        q, k = torch.randn(3, 3, 40, 8, requires_grad=True), torch.randn(3, 3, 40, 8, requires_grad=True)
        coef = torch.randn(3, 40, 4, 3, requires_grad=True)
        out = cpu_kernel.fourier_reduce(q, k, coef, 0.5, 2)
        want = _plain(q, k, coef, 0.5, 2)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        g = torch.randn_like(want)
        for got, ref in zip(torch.autograd.grad(out, (q, k, coef), g), torch.autograd.grad(want, (q, k, coef), g)):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    finally:
        torch.set_num_threads(before)


def _plain_masked(q, k, coef, scale, grid, bias, keep):
    """The plain formula with the host's additive bias and boolean mask (masked entries: zero features)."""
    kx = (scale * q @ k.transpose(-1, -2) + bias).unsqueeze(-1) * torch.arange(1, grid + 1, dtype=q.dtype)
    feats = torch.cat([kx.cos(), kx.sin()], -1) * keep.unsqueeze(-1).to(q.dtype)
    return torch.einsum("bhijm,hjmr->bhir", feats, coef)


@needs_kernel
@pytest.mark.parametrize("whole", [1 << 20, 0], ids=["logits-per-pair", "logits-per-tile"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_bias_and_mask_match_the_plain_formula(dtype, tol, whole, monkeypatch):
    """Strided views (stride 0 where they broadcast) of a per-head bias and a per-query mask, tiles included."""
    monkeypatch.setattr(cpu_kernel, "TILE_KEYS", 8)
    monkeypatch.setattr(cpu_kernel, "WHOLE_PAIR_LOGITS", whole)
    b, h, n, nk, d, grid, r = 2, 3, 37, 21, 5, 3, 4
    q = torch.randn(b, h, n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, nk, d, dtype=dtype, requires_grad=True)
    coef = torch.randn(h, nk, 2 * grid, r, dtype=dtype, requires_grad=True)
    bias = torch.randn(1, h, n, nk, dtype=dtype, requires_grad=True)
    keep = torch.rand(b, 1, n, nk) > 0.3
    shape = (b, h, n, nk)
    out = cpu_kernel.fourier_reduce(q, k, coef, 0.7, grid, bias.expand(shape), keep.expand(shape))
    want = _plain_masked(q, k, coef, 0.7, grid, bias, keep)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol * want.abs().max().item())
    g = torch.randn_like(want)
    inputs = (q, k, coef, bias)
    for got, ref in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("extras", ["bias", "keys", "queries", "bias+keys", "bias+queries"])
def test_hosts_bias_and_masks_run_the_kernel_and_match_the_reference(extras, monkeypatch):
    """ViTDet (dense rel-pos bias, padded-window key mask) and Swin (bias table, shift masks per query) calls,
    float64: outputs and the gradients of q, k, v, the bias and every operator parameter."""
    monkeypatch.setattr(cpu_kernel, "TILE_KEYS", 16)  # several key tiles and a partial query tile at N = 37
    b, h, n, d = 2, 2, 37, 4
    cfg = KArAtConfig(basis_type="FourierBasis", grid=3, hidden_dim=3, impl="reference")
    ref = KArAtCore(h, n, cfg).double()
    eff = KArAtCore(h, n, cfg.replace(impl="efficient"), operator_factory=lambda *_: ref.operator).double()
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(b, h, n, n, dtype=torch.float64, requires_grad=True) if "bias" in extras else None
    keep = None
    if "keys" in extras:
        keep = torch.rand(b, 1, 1, n) > 0.3
    elif "queries" in extras:
        keep = torch.rand(b, 1, n, n) > 0.3
    if keep is not None:
        keep[..., 0] = True
    with torch.profiler.profile() as prof:
        out = eff(q, k, v, bias=bias, key_mask=keep)
        g = torch.randn_like(out)
        inputs = [q, k, v] + ([bias] if bias is not None else []) + [
            p for p in ref.operator.parameters() if p.requires_grad]
        got = torch.autograd.grad(out, inputs, g, allow_unused=True)
    names = {e.name for e in prof.events()}
    assert "karat::fourier_reduce" in names and "karat::fourier_reduce_backward" in names
    want_out = ref(q, k, v, bias=bias, key_mask=keep)
    torch.testing.assert_close(out, want_out)
    want = torch.autograd.grad(want_out, inputs, g, allow_unused=True)
    assert_grads_close(got, want)


@needs_kernel
def test_opcheck_with_bias_and_mask():
    """The optional bias (a broadcast view that needs a gradient) and mask through schema, fake and autograd."""
    q, k = torch.randn(2, 2, 5, 3, requires_grad=True), torch.randn(2, 2, 6, 3, requires_grad=True)
    coef = torch.randn(2, 6, 4, 3, requires_grad=True)
    bias = torch.randn(1, 2, 5, 6, requires_grad=True).expand(2, 2, 5, 6)
    keep = (torch.rand(2, 1, 1, 6) > 0.3).expand(2, 2, 5, 6)
    torch.library.opcheck(cpu_kernel.fourier_reduce, (q, k, coef, 0.5, 2, bias, keep))
    torch.library.opcheck(cpu_kernel.fourier_reduce, (q, k, coef, 0.5, 2, bias.detach(), None))
    torch.library.opcheck(cpu_kernel.fourier_reduce, (q, k, coef, 0.5, 2, None, keep))


@needs_kernel
def test_a_vitdet_call_is_served_by_the_kernel():
    """Decomposed rel-pos bias that needs a gradient and a padded-window key mask: the kernel, not PyTorch."""
    from karat.relpos import DecomposedRelPos

    b, h, side, d = 2, 2, 7, 8
    n = side * side
    core = KArAtCore(h, n, KArAtConfig(basis_type="FourierBasis", grid=3, hidden_dim=4, impl="efficient"))
    q = torch.randn(b, h, n, d)
    rel = DecomposedRelPos(torch.randn(b, h, n, side, requires_grad=True), torch.randn(b, h, n, side))
    keep = torch.rand(b, 1, 1, n) > 0.2
    choice = core.choose_path(q, rel, keep)
    assert (choice.path, choice.detail) == ("efficient", "C++ CPU kernel"), choice.describe()
    assert efficient.detail(core.operator, q, rel.dense(), keep) == "C++ CPU kernel"
    assert efficient.detail(core.operator, q, rel.dense(), keep.float()) == "PyTorch, blockwise"  # not a bool mask


LOAD = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, format="%(message)s")
from karat.kernels import fused_cpu
print(fused_cpu.available(), fused_cpu.unavailable_reason())
"""


@needs_kernel
@pytest.mark.parametrize("stale", [False, True], ids=["cached", "library-out-of-date"])
def test_a_lock_file_left_by_a_killed_build_blocks_nothing(stale, tmp_path):
    """``torch.utils.cpp_extension`` guards a build with a lock *file*; a process killed while building (a torchrun
    worker, Ctrl-C) leaves it behind, and every later ``load`` then waited for it forever. A cached library is now
    imported without touching it, and a build removes it under an ``flock`` (which dies with its holder)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    built = cpu_kernel._cache_dir()
    cache = tmp_path / "cache"
    copy = cache / built.name
    shutil.copytree(built, copy)
    (copy / "lock").write_text("")  # what a build killed midway leaves
    if stale:  # older than the source: ninja relinks it (seconds; the object file is current)
        os.utime(copy / f"{cpu_kernel.LIBRARY}.so", (0, 0))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, KARAT_CACHE=str(cache), PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "None"], proc.stdout + proc.stderr[-3000:]
    said = "building the fused CPU kernel" if stale else "loading the fused CPU kernel"
    assert said in proc.stderr, proc.stderr[-3000:]
    assert (copy / "lock").exists() != stale  # a load leaves it alone; a build takes it away
