"""Compile Triton kernels for a GPU that is not here, and read what the compiled kernel spends per logit.

Triton's wheel bundles ``ptxas`` and ``nvdisasm``: :func:`compile_kernel` builds a kernel for ``sm_<arch>`` on a
CPU-only machine, :func:`capture` records every kernel a module's own ``compile_offline`` builds (so a kernel module
needs no code of its own to be measured), and :func:`kernel_stats` reads registers, spills and shared memory from
``ptxas -v`` and counts the SASS instructions of the kernel's main loop. That is the evidence the kernels are tuned
from without a GPU (``python -m tools.kernel_table``, ``benchmarks/gpu_kernel_table.md``).

Per logit: the static SASS count of the main loop's body (:func:`main_loop`: one key block of the forward and dq
kernels, one query block of the dk kernel, one block of a window's query rows in the whole-window kernels) times
the warps of a program, over the ``BM x BN`` (``BM x NP``) logits that one iteration evaluates, i.e. warp
instructions issued per logit. Static counts: a branch that is
rarely taken (a slow path) counts as if it were taken.
"""
from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

# SASS opcodes (before the first '.') grouped as the table reports them
CLASSES: Dict[str, Tuple[str, ...]] = {
    "mma": ("HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA"),  # tensor-core matrix multiply-accumulate
    "sincos": ("MUFU.SIN", "MUFU.COS"),  # special-function unit sine and cosine
    "mufu": ("MUFU",),  # every SFU op (sin, cos, ex2, rcp, ...)
    "ffma": ("FFMA",),
    "fp32": ("FFMA", "FMUL", "FADD"),  # fp32 arithmetic on the CUDA cores
    "fp64": ("DMUL", "DFMA", "DADD"),
    "ldg": ("LDG", "LDGSTS"),  # global loads (direct, and async copies into shared memory)
    "stg": ("STG", "RED", "ATOM", "ATOMG"),  # global stores and reductions
    "local": ("LDL", "STL"),  # local memory: spills and stack arrays
    "shared": ("LDS", "LDSM", "STS"),
}
TILE = ("BM", "BN", "NP")  # the constexprs whose product is the logits of one main-loop iteration (BN or NP)


def tool(name: str) -> str:
    """Path of a tool bundled with Triton's NVIDIA backend (``nvdisasm``, ``cuobjdump``)."""
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, **options):
    """``triton.compile`` of one JIT function for ``sm_<arch>`` (``options``: num_warps, num_stages, ...);
    ``constexprs`` is keyed by argument name."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items() if k in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                          options=options or None)


@contextlib.contextmanager
def capture() -> Iterator[List[tuple]]:
    """Record ``(source, compiled)`` for every ``triton.compile`` call in the block."""
    import triton

    seen: List[tuple] = []
    original = triton.compile

    def recording(src, *args, **kwargs):
        compiled = original(src, *args, **kwargs)
        seen.append((src, compiled))
        return compiled

    triton.compile = recording
    try:
        yield seen
    finally:
        triton.compile = original


def ptxas_info(ptx: str, arch: int) -> Dict[str, int]:
    """Registers, spill bytes and stack frame of the PTX as ptxas reports them (``ptxas -v``, Triton's flags)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True, check=True)
    log = proc.stderr + proc.stdout

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return dict(registers=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"))


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def sass(cubin: bytes) -> Tuple[List[Tuple[int, str, str]], Dict[str, int]]:
    """(address, opcode with modifiers, operands) of every instruction of the cubin (``nvdisasm``), and the
    address of each branch label."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout
    labels: Dict[str, int] = {}
    insns: List[Tuple[int, str, str]] = []
    pending: List[str] = []
    for line in text.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _INSN.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            insns.append((addr, m.group(2), m.group(3)))
    return insns, labels


def main_loop(insns: List[Tuple[int, str, str]], text_labels: Dict[str, int]) -> Tuple[int, int]:
    """(first, last) address of the main loop: of the loops (backward branches) holding the most tensor-core
    instructions, the innermost. The flash kernels have one such loop (over key or query blocks); the whole-window
    kernels loop over a program's windows and, inside, over a window's query-row blocks, which is the one counted."""
    best, best_key = (0, -1), (-1, 0)
    for addr, op, operands in insns:
        if op.split(".")[0] != "BRA":
            continue
        m = re.search(r"(\.L_x_\d+)", operands)
        if m and m.group(1) in text_labels and text_labels[m.group(1)] <= addr:
            start = text_labels[m.group(1)]
            mma = sum(1 for a, o, _ in insns if start <= a <= addr and o.split(".")[0] in CLASSES["mma"])
            key = (mma, start - addr)  # most MMAs, then the shortest span
            if key > best_key:
                best, best_key = (start, addr), key
    return best


def count(ops: List[str]) -> Dict[str, int]:
    """Instruction counts per class of :data:`CLASSES` (and ``all``)."""
    full = Counter(ops)
    base = Counter(op.split(".")[0] for op in ops)
    out = {"all": len(ops)}
    for name, members in CLASSES.items():
        out[name] = sum(full[m] if "." in m else base[m] for m in members)
    return out


def kernel_stats(src, compiled) -> dict:
    """What one compiled kernel costs: registers, spills, stack, shared memory, its launch options, and the
    instruction mix of its main loop per logit (module docstring) and of the whole kernel."""
    md = compiled.metadata
    arch = md.target.arch
    names = src.fn.arg_names
    consts = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in src.constants.items()}
    out = dict(kernel=md.name, arch=f"sm_{arch}", num_warps=md.num_warps, num_stages=md.num_stages,
               shared=md.shared, **ptxas_info(compiled.asm["ptx"], arch))
    out["tile"] = [consts[t] for t in TILE if t in consts]
    insns, labels = sass(compiled.asm["cubin"])
    first, last = main_loop(insns, labels)
    out["total"] = count([op for _, op, _ in insns])
    loop = count([op for addr, op, _ in insns if first <= addr <= last])
    out["loop"] = loop
    logits = 1
    for t in out["tile"]:
        logits *= t
    out["per_logit"] = {k: round(v * md.num_warps / logits, 3) for k, v in loop.items()} if len(out["tile"]) == 2 \
        else {}
    return out


def stats_of(build, *args, **kwargs) -> List[dict]:
    """:func:`kernel_stats` of every kernel ``build(*args, **kwargs)`` compiles (a module's ``compile_offline``),
    with one compile each."""
    with capture() as seen:
        build(*args, **kwargs)
    return [kernel_stats(src, compiled) for src, compiled in seen]
