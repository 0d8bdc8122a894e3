"""A fused CPU kernel for the Fourier ``phi1_w2`` key reduction, JIT-built with the machine's C++ compiler.

The PyTorch path (``karat.kernels.efficient``) evaluates each key block as separate passes: logits, then 2G feature
planes, then a GEMM. On a CPU those elementwise passes over ``N x N x 2G`` entries dominate. The kernel in
``csrc/fourier_cpu.cpp`` instead walks each (batch, head) pair in (query tile, key tile) steps that stay in cache:
one GEMM for the logits (plus the host's additive bias), one sin/cos per logit plus the angle-addition recurrence,
the host's boolean mask, one GEMM against the coefficients; backward recomputes the tile. It is registered with
``torch.library`` as ``karat::fourier_reduce`` (with autograd and a fake kernel), so autograd, ``torch.compile``,
``torch.export`` and fx see one operator.

The build is cached under ``~/.cache/karat`` (``KARAT_CACHE`` overrides) and keyed by the CPU's instruction set
(it is built with ``-march=native``), the torch version and the kernel's source. Without a compiler, or if the
build fails, :func:`available` returns False after one warning (:func:`unavailable_reason` keeps the whole error)
and ``karat.kernels.efficient`` keeps its PyTorch path; ``KARAT_CPU_KERNEL=0`` disables it. Only a real build is
logged (INFO); loading the cached library is DEBUG. ``torch.compile`` takes :func:`available` as a constant: the
build or load runs eagerly when the first compiled call is traced, never inside the graph.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

import torch

SOURCE = Path(__file__).with_name("csrc") / "fourier_cpu.cpp"
TILE_KEYS = 256  # keys per tile (32 queries each): about 200 kB of features at G = 3, evaluated in cache
WHOLE_PAIR_LOGITS = 1 << 20  # up to this many logits per (batch, head), one GEMM computes them all (4 MB fp32)
_state: dict = {}


def _cache_dir() -> Path:
    root = Path(os.environ.get("KARAT_CACHE", Path.home() / ".cache" / "karat"))
    flags = ""
    try:  # -march=native code must not be reused on a CPU with other instructions
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    try:  # a changed kernel builds into its own directory instead of reusing (or rebuilding over) another's
        source = hashlib.sha1(SOURCE.read_bytes()).hexdigest()
    except OSError:
        source = ""
    key = hashlib.sha1(f"{flags}|{torch.__version__}|{source}".encode()).hexdigest()[:12]
    path = root / f"cpu_kernel_{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


LIBRARY = "karat_fourier_cpu"  # the extension's name: cpp_extension writes ``<LIBRARY>.so`` into the cache dir
_log = logging.getLogger(__name__)


def _is_cached(build_dir: Path) -> bool:
    """Whether ``build_dir`` holds a library built from the current source, so that loading it compiles nothing
    (ninja rebuilds only what is older than the source; the directory is keyed by CPU, torch and source)."""
    library = build_dir / f"{LIBRARY}.so"
    try:
        return library.stat().st_mtime >= SOURCE.stat().st_mtime
    except OSError:
        return False


def _cpp_extension_load() -> Any:
    """``torch.utils.cpp_extension.load``, imported without the warning it logs on a machine with a CUDA toolkit
    but no GPU ("No CUDA runtime is found"): nothing here needs CUDA. Imported even where the cached library is
    loaded without it, so that Inductor's later import (its C++ code generation) finds it imported and stays quiet
    too."""
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        torch_log.setLevel(level)
    return load


@contextlib.contextmanager
def _lock(build_dir: Path, exclusive: bool) -> Iterator[None]:
    """Held while the library is built (exclusive) or imported (shared), across processes (two ranks of a
    ``torchrun``). An ``flock`` dies with its holder; ``cpp_extension``'s own lock is a *file* that a build killed
    midway leaves behind, after which every later build waits on it forever: under the exclusive lock such a file is
    known to be stale and is removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: cpp_extension's lock file alone
        yield
        return
    with open(build_dir / "karat.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            if exclusive:
                (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import(build_dir: Path) -> Any:
    """The built library, imported as the Python module it is: no ninja run and no lock file."""
    spec = importlib.util.spec_from_file_location(LIBRARY, build_dir / f"{LIBRARY}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build() -> Any:
    load = _cpp_extension_load()
    build_dir = _cache_dir()
    with _lock(build_dir, exclusive=False):
        if _is_cached(build_dir):
            _log.debug("karat: loading the fused CPU kernel from %s", build_dir)
            return _import(build_dir)
    with _lock(build_dir, exclusive=True):
        if _is_cached(build_dir):  # another process built it while this one waited
            _log.debug("karat: loading the fused CPU kernel from %s", build_dir)
            return _import(build_dir)
        _log.info("karat: building the fused CPU kernel into %s (once per machine, about a minute)", build_dir)
        return load(name=LIBRARY, sources=[str(SOURCE)], build_directory=str(build_dir),
                    extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)


def extension() -> Optional[Any]:
    """The compiled extension, building it on first use; None (after one warning) where it cannot be built. Why
    it is missing is kept for :func:`unavailable_reason`."""
    if "ext" not in _state:
        _state["ext"] = None
        if os.environ.get("KARAT_CPU_KERNEL", "1") == "0":
            _state["error"] = "disabled by KARAT_CPU_KERNEL=0"
        else:
            try:
                _state["ext"] = _build()
            except Exception as exc:  # noqa: BLE001 - any build failure means: use the PyTorch path
                text = str(exc).strip()
                _state["error"] = f"{type(exc).__name__}: {text or repr(exc)}"
                warnings.warn(f"karat: the fused CPU kernel could not be built ({type(exc).__name__}: "
                              f"{text.splitlines()[-1] if text else repr(exc)}); using the "
                              f"slower PyTorch path. Install a C++ compiler (g++) to enable it.", stacklevel=3)
    return _state["ext"]


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the fused kernel is built (building it now if needed).

    The answer does not change within a process, so ``torch.compile`` and ``torch.export`` call this eagerly while
    they trace and keep the result as a constant: the build (a file lock, a compiler, logging) never enters the
    traced region, which would otherwise break the graph there (``fullgraph=True`` would fail)."""
    return extension() is not None


def unavailable_reason() -> Optional[str]:
    """None where the kernel is built (building it now if needed); else why not: ``KARAT_CPU_KERNEL=0``, or the
    build's whole error (the compiler's output included), which the one-line warning shortens."""
    return None if available() else _state.get("error", "unknown")


def _check_extras(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor],
                  key_mask: Optional[torch.Tensor]) -> None:
    shape = (*q.shape[:-1], k.shape[-2])
    if bias is not None and (tuple(bias.shape) != shape or bias.dtype != q.dtype):
        raise ValueError(f"karat::fourier_reduce: bias must be a {q.dtype} view of shape {shape} (expand it, do not "
                         f"copy), got {bias.dtype} {tuple(bias.shape)}")
    if key_mask is not None and (tuple(key_mask.shape) != shape or key_mask.dtype != torch.bool):
        raise ValueError(f"karat::fourier_reduce: key_mask must be a bool view of shape {shape} (expand it), got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)}")


@torch.library.custom_op("karat::fourier_reduce", mutates_args=(), device_types="cpu")
def fourier_reduce(q: torch.Tensor, k: torch.Tensor, coef: torch.Tensor, scale: float, grid: int,
                   bias: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, H, N, r)``: ``sum_j mask_ij sum_m B_m(scale q_i . k_j + bias_ij) coef[h, j, m]``, Fourier features
    ``B`` of order ``grid``.

    q ``(B, H, N, d)``, k ``(B, H, N_k, d)``, coef ``(H, N_k, 2 grid, r)``, all fp32 or all float64; the optional
    bias (q's dtype) and key_mask (bool) are ``(B, H, N, N_k)`` views, stride 0 where they broadcast."""
    ext = extension()
    if ext is None:
        raise RuntimeError("karat::fourier_reduce needs the fused CPU kernel, which could not be built")
    _check_extras(q, k, bias, key_mask)
    return ext.forward(q, k, coef, scale, grid, TILE_KEYS, WHOLE_PAIR_LOGITS, bias, key_mask)


@fourier_reduce.register_fake
def _(q, k, coef, scale, grid, bias=None, key_mask=None):
    return q.new_empty(*q.shape[:-1], coef.shape[-1])


@torch.library.custom_op("karat::fourier_reduce_backward", mutates_args=(), device_types="cpu")
def fourier_reduce_backward(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, coef: torch.Tensor, scale: float,
                            grid: int, bias: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                            need_bias: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dcoef, dS)`` of :func:`fourier_reduce`, recomputing each tile (nothing N x N is kept
    unless ``need_bias`` asks for the logit gradient ``dS = dL/dbias``, ``(B, H, N, N_k)``; else it is empty)."""
    ext = extension()
    if ext is None:
        raise RuntimeError("karat::fourier_reduce_backward needs the fused CPU kernel, which could not be built")
    # d cos(gx)/dx = -g sin(gx), d sin(gx)/dx = g cos(gx): row m of coef_rot is scale_m * coef[perm(m)]
    freq = torch.arange(1, grid + 1, dtype=coef.dtype)
    perm = torch.cat([torch.arange(grid, 2 * grid), torch.arange(grid)])
    coef_rot = coef[:, :, perm] * torch.cat([freq, -freq])[:, None]
    dq, dk, dcoef, dbias = ext.backward(dy, q, k, coef_rot, scale, grid, TILE_KEYS, WHOLE_PAIR_LOGITS, bias, key_mask,
                                        bool(need_bias and bias is not None))
    return dq, dk, dcoef, dbias


@fourier_reduce_backward.register_fake
def _(dy, q, k, coef, scale, grid, bias=None, key_mask=None, need_bias=False):
    # contiguous, as the kernel writes them (q and k are often strided slices of a fused qkv): Inductor checks it
    dbias = q.new_empty(*q.shape[:-1], k.shape[-2]) if need_bias and bias is not None else q.new_empty(0)
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(coef.shape), dbias


def _setup_context(ctx, inputs, output) -> None:
    q, k, coef, scale, grid, bias, key_mask = inputs
    ctx.save_for_backward(q, k, coef, bias, key_mask)
    ctx.scale, ctx.grid = scale, grid


def _backward(ctx, dy):
    q, k, coef, bias, key_mask = ctx.saved_tensors
    need_bias = bias is not None and ctx.needs_input_grad[5]
    dq, dk, dcoef, dbias = fourier_reduce_backward(dy, q, k, coef, ctx.scale, ctx.grid, bias, key_mask, need_bias)
    return dq, dk, dcoef, None, None, dbias if need_bias else None, None


fourier_reduce.register_autograd(_backward, setup_context=_setup_context)
