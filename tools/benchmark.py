#!/usr/bin/env python
"""Speed and memory of KArAt against softmax attention, side by side in one run.

Every case runs in a fresh subprocess. Peak memory is the high-water mark of tensor memory during one
step, above what was allocated before it: on CUDA ``torch.cuda.max_memory_allocated``, on the CPU the
running sum of the allocator's allocation and free events recorded by ``torch.profiler`` (in a separate,
untimed step). Prints a markdown table with ratios to softmax and writes JSON.

  python tools/benchmark.py --level attention --tokens 197 --model tiny --batch 8
  python tools/benchmark.py --level model --model tiny small base --batch 32 --device cuda
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]

SIZES = {"tiny": dict(embed_dim=192, num_heads=3), "small": dict(embed_dim=384, num_heads=6),
         "base": dict(embed_dim=768, num_heads=12)}
GRID = {"tiny": 3, "small": 3, "base": 1}  # the paper's G for each size
IMPLS = ("softmax", "reference", "efficient", "fused")


def cpu_peak_mb(step) -> float:
    """Peak tensor memory above the starting point while ``step()`` runs, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2 ** 20


def profile_ops(step, top: int) -> List[List[Any]]:
    """``[op, calls, self CPU ms, share]`` of the ``top`` operators by self CPU time over one ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ops) or 1
    ops = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]
    return [[e.key, e.count, round(e.self_cpu_time_total / 1000, 1), f"{100 * e.self_cpu_time_total / total:.0f}%"]
            for e in ops]


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import torch
    import timm
    from timm.layers import Attention

    from karat import KArAtAttention, KArAtConfig

    torch.manual_seed(0)
    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    size, impl, batch = case["model"], case["impl"], case["batch"]
    dim, heads = SIZES[size]["embed_dim"], SIZES[size]["num_heads"]
    karat_kw = dict(basis_type="FourierBasis", grid=case.get("grid") or GRID[size], hidden_dim=12, blockwise=True)

    if case["level"] == "attention":
        n = case["tokens"]
        if impl == "softmax":
            module = Attention(dim, num_heads=heads, qkv_bias=True)
        else:
            module = KArAtAttention(dim, num_heads=heads, qkv_bias=True, num_tokens=n,
                                    karat_cfg=KArAtConfig(impl=impl, **karat_kw))
        module.to(device)
        x = torch.randn(batch, n, dim, device=device, requires_grad=True)

        def step():
            module(x).square().mean().backward()
        items = batch
    else:
        name = f"vit_{size}_patch16_224" + ("" if impl == "softmax" else "_karat")
        kw = {} if impl == "softmax" else dict(impl=impl, **karat_kw)
        model = timm.create_model(name, num_classes=1000, **kw).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, 224, 224, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        items = batch

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(case["warmup"]):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    times = []
    for _ in range(case["repeat"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2 ** 20
    else:
        peak = cpu_peak_mb(step)
    best = min(times)
    result = dict(case, seconds=best, items_per_s=items / best, peak_mb=peak)
    if case.get("profile"):
        result["profile"] = profile_ops(step, case["profile"])
    if case["level"] == "model":
        model.eval()
        with torch.no_grad():
            model(x)
            sync()
            t0 = time.perf_counter()
            for _ in range(case["repeat"]):
                model(x)
            sync()
        result["infer_items_per_s"] = items * case["repeat"] / (time.perf_counter() - t0)
    return result


def spawn(case: Dict[str, Any]) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(case, error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: List[Dict[str, Any]]) -> str:
    key = lambda r: (r["level"], r["model"], r.get("tokens"), r["batch"])  # noqa: E731
    softmax = {key(r): r for r in results if r["impl"] == "softmax" and "error" not in r}
    reference = {key(r): r for r in results if r["impl"] == "reference" and "error" not in r}
    model_level = any(r["level"] == "model" for r in results)
    head = ("| level | model | N | batch | impl | time (ms) | items/s | peak MB | mem / softmax | speed / softmax "
            "| mem / reference | speed / reference |")
    if model_level:
        head += " infer items/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['level']} | {r['model']} | {r.get('tokens', 197)} | {r['batch']} | {r['impl']} | "
                         f"error: {r['error'][:60]} |")
            continue
        base = softmax.get(key(r))
        mem_ratio = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base and base["peak_mb"] > 0 else "-"
        speed_ratio = f"{r['items_per_s'] / base['items_per_s']:.2f}x" if base else "-"
        ref = reference.get(key(r))
        ref_mem = f"{r['peak_mb'] / ref['peak_mb']:.2f}x" if ref and ref["peak_mb"] > 0 else "-"
        ref_speed = f"{r['items_per_s'] / ref['items_per_s']:.2f}x" if ref else "-"
        line = (f"| {r['level']} | {r['model']} | {r.get('tokens', 197)} | {r['batch']} | {r['impl']} | "
                f"{1000 * r['seconds']:.1f} | {r['items_per_s']:.1f} | {r['peak_mb']:.1f} | {mem_ratio} | "
                f"{speed_ratio} | {ref_mem} | {ref_speed} |")
        if model_level:
            line += f" {r.get('infer_items_per_s', 0):.1f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--level", choices=("attention", "model"), default="attention")
    p.add_argument("--model", nargs="+", default=["tiny"], choices=sorted(SIZES))
    p.add_argument("--tokens", nargs="+", type=int, default=[197])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grid", type=int, default=None, help="Fourier G (default: 3 for Tiny/Small, 1 for Base)")
    p.add_argument("--impl", nargs="+", default=None, choices=IMPLS,
                   help="default: softmax reference efficient, plus fused on CUDA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per case (the best counts)")
    p.add_argument("--rounds", type=int, default=3,
                   help="run every case this many times, interleaved, keeping the best: machine drift hits all alike")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="also print the TOP operators by self CPU time of one step (torch.profiler), per case")
    p.add_argument("--json", type=Path, help="write the results here (refuses to overwrite an existing file)")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    if args.json and args.json.exists():
        sys.exit(f"error: {args.json} exists; choose another --json path")
    impls = args.impl or [i for i in IMPLS if i != "fused" or args.device.startswith("cuda")]
    cases = make_cases(args.level, args.model, args.tokens, args.batch, impls, args.grid, args.device, args.repeat,
                       args.warmup, args.profile)
    results = run_rounds(cases, args.rounds)
    meta = environment(args.device)
    print()
    print(table(results))
    print_profiles(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    return 0


def make_cases(level: str, models: List[str], tokens: List[int], batch: int, impls: List[str], grid: int | None,
               device: str, repeat: int, warmup: int, profile: int = 0) -> List[Dict[str, Any]]:
    """One case per (model size, token count, implementation); the model level always has 197 tokens."""
    tokens = tokens if level == "attention" else [197]
    return [dict(level=level, model=size, tokens=n, batch=batch, impl=impl, grid=grid, device=device,
                 repeat=repeat, warmup=warmup, profile=profile)
            for size in models for n in tokens for impl in impls]


def run_rounds(cases: List[Dict[str, Any]], rounds: int) -> List[Dict[str, Any]]:
    """Every case ``rounds`` times, interleaved, each in a fresh process; the fastest round of each is kept."""
    best: Dict[int, Dict[str, Any]] = {}
    for rnd in range(rounds):
        for i, case in enumerate(cases):
            r = spawn(case)
            prev = best.get(i)
            if prev is None or "error" in r or "error" in prev:
                best[i] = r
            else:  # keep the fastest round; memory is deterministic up to allocator noise, keep its minimum
                best[i] = dict(min(prev, r, key=lambda x: x["seconds"]), peak_mb=min(prev["peak_mb"], r["peak_mb"]))
            print(f"  round {rnd + 1} {case['model']:5s} N={case['tokens']:5d} {case['impl']:9s} "
                  + (f"{1000 * r['seconds']:9.1f} ms  {r['peak_mb']:9.1f} MB" if "error" not in r
                     else f"error: {r['error']}"), flush=True)
    return [best[i] for i in range(len(cases))]


def print_profiles(results: List[Dict[str, Any]]) -> None:
    """The ``--profile`` breakdowns, one markdown table per case."""
    for r in results:
        if r.get("profile"):
            print(f"\nprofile: {r['level']} {r['model']} N={r.get('tokens', 197)} {r['impl']} "
                  "(one step, self CPU time)\n")
            print("| op | calls | self ms | share |\n|---|---|---|---|")
            print("\n".join("| " + " | ".join(str(x) for x in row) + " |" for row in r["profile"]))


def environment(device: str) -> Dict[str, Any]:
    """Date, machine, torch and device of a run, stored beside its numbers."""
    import torch

    return dict(date=time.strftime("%Y-%m-%d"), machine=platform.machine(), processor=platform.processor(),
                cpus=__import__("os").cpu_count(), torch=torch.__version__, command=" ".join(sys.argv),
                device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu")


if __name__ == "__main__":
    sys.exit(main())
