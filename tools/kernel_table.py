#!/usr/bin/env python
"""What every shipped fused-kernel variant costs on an A100 (sm_80) and an H100 (sm_90), without a GPU.

  python -m tools.kernel_table --out benchmarks/gpu_kernel_table   # writes .md and .json

Each kernel module of :data:`MODULES` lists its variants (``SHIPPED_VARIANTS``: name -> (head_dim, G, r, dtype,
flags)) and compiles one with ``compile_offline(arch, head_dim, G, r, dtype, **flags)``; this tool records what
those compiles build (``karat.kernels.offline``): registers, spills, stack, shared memory, and the SASS
instruction mix of each kernel's main loop per logit. A module that is not there (yet) is skipped with a note.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Sequence

# kernel modules measured: one line each (a module exposing SHIPPED_VARIANTS and compile_offline)
MODULES = (
    "karat.kernels.fused_triton",
    "karat.kernels.fused_window",
)

COLUMNS = [("mma", "MMA"), ("sincos", "SFU sin/cos"), ("mufu", "SFU all"), ("ffma", "FFMA"), ("fp32", "FP32 ops"),
           ("fp64", "FP64 ops"), ("ldg", "global ld"), ("stg", "global st"), ("local", "local ld/st"),
           ("shared", "shared ld/st"), ("all", "all")]


def measure(modules: Sequence[str], archs: Sequence[int], space: bool = False) -> tuple:
    """(rows, notes): one row per (module, variant, arch, kernel), or per launch configuration of each kernel's
    tuning space with ``space`` (a module whose ``compile_offline`` takes ``space=True``)."""
    from karat.kernels import offline

    rows, notes = [], []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            notes.append(f"{name}: not measured ({e})")
            continue
        variants = getattr(module, "SHIPPED_VARIANTS", None)
        if not variants:
            notes.append(f"{name}: not measured (no SHIPPED_VARIANTS)")
            continue
        for variant, (d, g, r, dtype, flags) in variants.items():
            for arch in archs:
                extra = dict(space=True) if space else {}
                for st in offline.stats_of(module.compile_offline, arch, d, g, r, dtype, **flags, **extra):
                    rows.append(dict(module=name.rsplit(".", 1)[-1], variant=variant, head_dim=d, G=g, r=r,
                                     dtype=dtype, flags=sorted(k for k, v in flags.items() if v), **st))
    return rows, notes


def markdown(rows: List[dict], notes: List[str], command: str) -> str:
    head = ["variant", "arch", "kernel", "tile", "warps", "stages", "regs", "spill st/ld B", "stack B",
            "shared B", *(label for _, label in COLUMNS)]
    lines = [
        "# Fused kernels, compiled offline: registers, spills, shared memory, instruction mix per logit", "",
        f"Command: `{command}`", "",
        "Compiled by Triton's bundled ptxas without a GPU (`karat/kernels/offline.py`). regs, spills, stack: "
        "`ptxas -v`; shared: Triton's allocation per program. Instruction columns: static SASS instructions "
        "(`nvdisasm`) in the kernel's main loop (one key block for the forward and dq kernels, one query block for "
        "dk) times the program's warps, over the tile's BM x BN logits: **warp instructions per logit** "
        "(x32 for lane operations). MMA: HMMA/HGMMA; SFU: MUFU; global ld: LDG + LDGSTS; local: LDL + STL "
        "(spills and stack arrays).", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pl = r["per_logit"]
        lines.append("| " + " | ".join(str(x) for x in [
            f"{r['module']}: {r['variant']} (d {r['head_dim']}, G {r['G']}, r {r['r']}, {r['dtype']})", r["arch"],
            r["kernel"].removeprefix("_phi_").removeprefix("_window_").removesuffix("_kernel"),
            "x".join(map(str, r["tile"])), r["num_warps"],
            r["num_stages"], r["registers"], f"{r['spill_stores']}/{r['spill_loads']}", r["stack"], r["shared"],
            *(pl.get(k, "-") for k, _ in COLUMNS)]) + " |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/gpu_kernel_table", help="path stem: writes STEM.md and STEM.json")
    p.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    p.add_argument("--modules", nargs="+", default=list(MODULES))
    p.add_argument("--space", action="store_true",
                   help="every launch configuration of each kernel's tuning space (the default first), not just the "
                        "default: that each fits in shared memory, and what it spills")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: the table needs real compiles, not the interpreter")
    start = time.time()
    rows, notes = measure(args.modules, args.archs, args.space)
    command = "python -m tools.kernel_table " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(command=command, notes=notes, rows=rows), indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, notes, command.strip()))
    print(markdown(rows, notes, command.strip()))
    print(f"{len(rows)} kernels in {time.time() - start:.0f} s -> {out}.md, {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
