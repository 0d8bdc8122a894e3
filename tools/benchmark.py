#!/usr/bin/env python
"""Speed and memory of KArAt against softmax attention, side by side in one run.

Every case runs in a fresh subprocess. Peak memory is the high-water mark of tensor memory during one
step, above what was allocated before it: on CUDA ``torch.cuda.max_memory_allocated``, on the CPU the
running sum of the allocator's allocation and free events recorded by ``torch.profiler`` (in a separate,
untimed step). Prints a markdown table with ratios to softmax and writes JSON.

  python tools/benchmark.py --level attention --tokens 197 --model tiny --batch 8
  python tools/benchmark.py --level model --model tiny small base --batch 32 --device cuda
  python tools/benchmark.py --level size --model tiny --img-size 256   # run-time resampling vs built for 256 px
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from karat import KArAtConfig
from karat.models.vision_transformer import VIT_KARAT_DEFAULTS, VIT_SIZES as SIZES

ROOT = Path(__file__).resolve().parents[1]

GRID = {size: VIT_KARAT_DEFAULTS[size].get("grid", KArAtConfig.grid) for size in SIZES}  # the paper's G per size
IMPLS = ("softmax", "reference", "efficient", "fused", "auto")


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
    karat_kw = dict(basis_type="FourierBasis", grid=case.get("grid") or GRID.get(size, 3), hidden_dim=12,
                    blockwise=True)

    if case["level"] == "host":
        module, x = host_model(case["model"], impl, karat_kw, device, batch)
        module = _compiled(module, case)

        def step():
            out = module(x)
            (out["last_feat"] if isinstance(out, dict) else out).square().mean().backward()
        items = batch
    elif case["level"] == "attention":
        n = case["tokens"]
        dim, heads = SIZES[size]["embed_dim"], SIZES[size]["num_heads"]
        if impl == "softmax":
            module = Attention(dim, num_heads=heads, qkv_bias=True)
        else:
            module = KArAtAttention(dim, num_heads=heads, qkv_bias=True, num_tokens=n,
                                    karat_cfg=KArAtConfig(impl=impl, **karat_kw))
        module = _compiled(module.to(device), case)
        x = torch.randn(batch, n, dim, device=device, requires_grad=True)

        def step():
            module(x).square().mean().backward()
        items = batch
    else:
        name = f"vit_{size}_patch16_224" + ("" if impl == "softmax" else "_karat")
        kw = {} if impl == "softmax" else dict(impl=impl, **karat_kw)
        model = timm.create_model(name, num_classes=1000, **kw).to(device)
        forward = _compiled(model, case)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, 224, 224, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)

        def step():
            if case.get("compile_mode") == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last one's graph outputs are done
            loss = torch.nn.functional.cross_entropy(forward(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        items = batch

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with record_paths() as paths:  # which evaluation path served the KArAt calls (karat.kernels.choose)
        step()
    for _ in range(case["warmup"] - 1):
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
    result = dict(case, seconds=best, items_per_s=items / best, peak_mb=peak,
                  path=" + ".join(sorted(set(paths))) if paths else "softmax")
    if case.get("profile"):
        result["profile"] = profile_ops(step, case["profile"])
    if case["level"] == "model":
        model.eval()
        with torch.no_grad():
            forward(x)
            sync()
            t0 = time.perf_counter()
            for _ in range(case["repeat"]):
                forward(x)
            sync()
        result["infer_items_per_s"] = items * case["repeat"] / (time.perf_counter() - t0)
    return result


def _compiled(module, case: Dict[str, Any]):
    """``torch.compile(module, backend=case["compile"], mode=case["compile_mode"])`` where the case asks for it
    (``--compile``, ``--compile-mode``), else module: compiling the step takes the host's per-op cost out, which
    dominates small widths on a GPU; ``reduce-overhead`` replays the step's kernels as CUDA graphs."""
    if not case.get("compile"):
        return module
    import torch

    torch._dynamo.reset()
    return torch.compile(module, backend=case["compile"], mode=case.get("compile_mode"))


# Host attentions against each host's own softmax model: detectron2's ViTDet ViT-Tiny backbone at 512 px (window
# blocks of 14 x 14 tokens with the decomposed rel-pos and padded windows, global blocks of 32 x 32 tokens), and
# timm's Swin-T (window attention with its bias table and shifted-window masks, 49 tokens), at 224 px.
HOSTS = {
    "vitdet": dict(tokens=1024, img=512),
    "swin": dict(tokens=49, img=224),
}


def host_model(name: str, impl: str, karat_kw: Dict[str, Any], device, batch: int):
    """(model, input) of a host case: the host's own softmax model, or its KArAt counterpart."""
    import torch

    x = torch.randn(batch, 3, HOSTS[name]["img"], HOSTS[name]["img"], device=device)
    if name == "vitdet":
        vit = dict(img_size=512, patch_size=16, embed_dim=192, depth=12, num_heads=3, window_size=14,
                   window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10], use_rel_pos=True, mlp_ratio=4.0, qkv_bias=True)
        if impl == "softmax":
            from detectron2.modeling import ViT

            return ViT(**vit).to(device), x
        from detectron2_plugin.backbone import KArAtViT

        return KArAtViT(**vit, karat=dict(impl=impl, **karat_kw)).to(device), x
    import timm

    kw = {} if impl == "softmax" else dict(impl=impl, **karat_kw)
    name = "swin_tiny_patch4_window7_224" + ("" if impl == "softmax" else "_karat")
    return timm.create_model(name, num_classes=1000, **kw).to(device), x


class record_paths:
    """Collects ``Choice.describe()`` of every ``karat.kernels.choose`` call made inside the ``with`` block."""

    def __enter__(self) -> List[str]:
        from karat import kernels

        self.kernels, self.original, self.seen = kernels, kernels.choose, []

        def choose(*args, **kwargs):
            choice = self.original(*args, **kwargs)
            self.seen.append(choice.describe())
            return choice

        kernels.choose = choose
        return self.seen

    def __exit__(self, *exc) -> None:
        self.kernels.choose = self.original


def run_in_process(case: Dict[str, Any]) -> Dict[str, Any]:
    """One case in this process (CUDA: its peak memory is the allocator's high-water mark above what the case
    started with, so earlier cases do not count; saves a process start per case)."""
    import gc

    import torch

    try:
        return run_case(case)
    except Exception as e:  # noqa: BLE001  out of memory or a failing path: reported in the table, the run goes on
        return dict(case, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def spawn(case: Dict[str, Any]) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "tools.benchmark", "--case", json.dumps(case)], capture_output=True,
                          text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return dict(case, error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label(r: Dict[str, Any]) -> str:
    """The impl column: the impl, and the torch.compile backend (and mode) where the case was compiled."""
    how = ", ".join(filter(None, (r.get("compile"), r.get("compile_mode"))))
    return r["impl"] + (f" + compile ({how})" if r.get("compile") else "")


def table(results: List[Dict[str, Any]]) -> str:
    key = lambda r: (r["level"], r["model"], r.get("tokens"), r["batch"], r.get("compile"),  # noqa: E731
                     r.get("compile_mode"))
    softmax = {key(r): r for r in results if r["impl"] == "softmax" and "error" not in r}
    reference = {key(r): r for r in results if r["impl"] == "reference" and "error" not in r}
    model_level = any(r["level"] == "model" for r in results)
    head = ("| level | model | N | batch | impl | path | time (ms) | items/s | peak MB | mem / softmax "
            "| speed / softmax | mem / reference | speed / reference |")
    if model_level:
        head += " infer items/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['level']} | {r['model']} | {r.get('tokens', 197)} | {r['batch']} | {label(r)} | - | "
                         f"error: {r['error'][:60]} |")
            continue
        base = softmax.get(key(r))
        mem_ratio = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base and base["peak_mb"] > 0 else "-"
        speed_ratio = f"{r['items_per_s'] / base['items_per_s']:.2f}x" if base else "-"
        ref = reference.get(key(r))
        ref_mem = f"{r['peak_mb'] / ref['peak_mb']:.2f}x" if ref and ref["peak_mb"] > 0 else "-"
        ref_speed = f"{r['items_per_s'] / ref['items_per_s']:.2f}x" if ref else "-"
        line = (f"| {r['level']} | {r['model']} | {r.get('tokens', 197)} | {r['batch']} | {label(r)} | "
                f"{r.get('path', '-')} | "
                f"{1000 * r['seconds']:.1f} | {r['items_per_s']:.1f} | {r['peak_mb']:.1f} | {mem_ratio} | "
                f"{speed_ratio} | {ref_mem} | {ref_speed} |")
        if model_level:
            line += f" {r.get('infer_items_per_s', 0):.1f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--level", choices=("attention", "model", "host", "size"), default="attention",
                   help="one attention layer, a whole ViT training step, a host's own model (--model vitdet swin), "
                        "or a ViT at --img-size px with its operators resampled at run time vs built for that size")
    p.add_argument("--img-size", type=int, default=256, help="--level size: the input size (the model is built "
                                                             "for 224 px)")
    p.add_argument("--model", nargs="+", default=["tiny"], choices=sorted(SIZES) + sorted(HOSTS))
    p.add_argument("--tokens", nargs="+", type=int, default=[197])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grid", type=int, default=None, help="Fourier G (default: 3 for Tiny/Small, 1 for Base)")
    p.add_argument("--impl", nargs="+", default=None, choices=IMPLS,
                   help="default: softmax reference efficient, plus fused on CUDA (auto: what KArAt picks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per case (the best counts)")
    p.add_argument("--rounds", type=int, default=3,
                   help="run every case this many times, interleaved, keeping the best: machine drift hits all alike")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="also print the TOP operators by self CPU time of one step (torch.profiler), per case")
    p.add_argument("--compile", metavar="BACKEND", default=None,
                   help="torch.compile every case's module with this backend (inductor, aot_eager); ratios compare "
                        "compiled with compiled")
    p.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs)")
    p.add_argument("--json", type=Path, help="write the results here (refuses to overwrite an existing file)")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    if args.json and args.json.exists():
        sys.exit(f"error: {args.json} exists; choose another --json path")
    if args.level == "size":
        result = size_cost(args.model[0], args.img_size, args.batch, args.device, args.repeat, args.rounds)
        print(size_table(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(dict(meta=environment(args.device), **result), indent=1))
        return 0
    impls = args.impl or [i for i in IMPLS if i != "auto" and (i != "fused" or args.device.startswith("cuda"))]
    cases = make_cases(args.level, args.model, args.tokens, args.batch, impls, args.grid, args.device, args.repeat,
                       args.warmup, args.profile, args.compile, args.compile_mode)
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
               device: str, repeat: int, warmup: int, profile: int = 0,
               compile_backend: Optional[str] = None, compile_mode: Optional[str] = None) -> List[Dict[str, Any]]:
    """One case per (model, token count, implementation); the model level always has 197 tokens, the host level
    its host's (``HOSTS``). A compiled case warms up at least 3 steps (the first ones compile, recompile and, with
    ``reduce-overhead``, record the CUDA graphs)."""
    def token_counts(model: str) -> List[int]:
        return tokens if level == "attention" else [HOSTS[model]["tokens"]] if level == "host" else [197]

    return [dict(level=level, model=model, tokens=n, batch=batch, impl=impl, grid=grid, device=device,
                 repeat=repeat, warmup=max(3 if compile_backend else 1, warmup), profile=profile,
                 compile=compile_backend, **({"compile_mode": compile_mode} if compile_mode else {}))
            for model in models for n in token_counts(model) for impl in impls]


def run_rounds(cases: List[Dict[str, Any]], rounds: int, in_process: bool = False,
               on_result: Optional[Callable[[Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
    """Every case ``rounds`` times, interleaved, each in a fresh process (or in this one: ``in_process``); the
    fastest round of each is kept. ``on_result`` sees every measurement as it is made."""
    best: Dict[int, Dict[str, Any]] = {}
    for rnd in range(rounds):
        for i, case in enumerate(cases):
            r = run_in_process(case) if in_process else spawn(case)
            if on_result is not None:
                on_result(r)
            prev = best.get(i)
            if prev is None or "error" in r or "error" in prev:
                best[i] = r
            else:  # keep the fastest round; memory is deterministic up to allocator noise, keep its minimum
                best[i] = dict(min(prev, r, key=lambda x: x["seconds"]), peak_mb=min(prev["peak_mb"], r["peak_mb"]))
            print(f"  round {rnd + 1} {case['model']:5s} N={case['tokens']:5d} {label(case):9s} "
                  + (f"{1000 * r['seconds']:9.1f} ms  {r['peak_mb']:9.1f} MB" if "error" not in r
                     else f"error: {r['error']}"), flush=True)
    return [best[i] for i in range(len(cases))]


def size_cost(model: str, img: int, batch: int, device: str, repeat: int, rounds: int,
              native_img: int = 224) -> Dict[str, Any]:
    """What run-time resampling costs (spec section 6): a KArAt ViT built for ``native_img`` px with
    ``dynamic_img_size=True`` given ``img`` px, against the same model built for ``img`` px. First forward (the
    operators resampled, then cached), later forwards (``torch.no_grad``, eval: from the cache) and training steps
    (resampled on every call, differentiably), best of ``repeat`` per round, rounds interleaved."""
    import torch
    import timm

    torch.manual_seed(0)
    dev = torch.device(device)
    name = f"vit_{model}_patch16_224_karat"
    kw = dict(num_classes=1000, basis_type="FourierBasis", grid=GRID[model], hidden_dim=12, blockwise=True)
    models = {"built for the size": timm.create_model(name, img_size=img, **kw).to(dev),
              "resampled at run time": timm.create_model(name, img_size=native_img, dynamic_img_size=True,
                                                         **kw).to(dev)}
    x = torch.randn(batch, 3, img, img, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def forward(m):
        with torch.no_grad():
            m(x)

    def train_step(m, opt):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    forward(timm.create_model(name, img_size=img, **kw).to(dev).eval())  # kernels loaded before any timing
    out: Dict[str, Dict[str, float]] = {}
    for key, m in models.items():
        m.eval()
        out[key] = dict(first_forward=timed(lambda: forward(m)), forward=float("inf"), train_step=float("inf"))
    opts = {key: torch.optim.AdamW(m.parameters(), lr=1e-5) for key, m in models.items()}
    for _ in range(rounds):
        for key, m in models.items():
            m.eval()
            out[key]["forward"] = min([out[key]["forward"]] + [timed(lambda: forward(m)) for _ in range(repeat)])
            m.train()
            train_step(m, opts[key])  # warm: the optimizer state exists
            out[key]["train_step"] = min([out[key]["train_step"]]
                                         + [timed(lambda: train_step(m, opts[key])) for _ in range(repeat)])
    native, runtime = out["built for the size"], out["resampled at run time"]
    return dict(model=model, img=img, native_img=native_img, batch=batch, device=device, results=out,
                forward_ratio=runtime["forward"] / native["forward"],
                train_ratio=runtime["train_step"] / native["train_step"])


def size_table(r: Dict[str, Any]) -> str:
    head = (f"| ViT-{r['model'].capitalize()} at {r['img']} px, batch {r['batch']} | first forward (ms) | forward (ms) "
            f"| forward / built | train step (ms) | step / built |")
    lines = [head, "|---|---|---|---|---|---|"]
    native = r["results"]["built for the size"]
    for key, v in r["results"].items():
        lines.append(f"| {key} | {1000 * v['first_forward']:.1f} | {1000 * v['forward']:.1f} | "
                     f"{v['forward'] / native['forward']:.3f}x | {1000 * v['train_step']:.1f} | "
                     f"{v['train_step'] / native['train_step']:.3f}x |")
    return "\n".join(lines)


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
