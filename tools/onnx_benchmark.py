#!/usr/bin/env python
"""KArAt against softmax in ONNX Runtime on the CPU, each model exported the same way, side by side in one run.

Exports (``torch.onnx.export``, the exporter named by ``--exporter``, default options otherwise) timm's softmax
ViT-Tiny and KArAt ViT-Tiny (its defaults), and with ``--vitdet`` the backbones of detectron2's ViTDet-T COCO config
and of our KArAt one (1024 px: 4,096-token global blocks). Then, in ONNX Runtime's CPU provider:

* session options: the same for both models, set explicitly (``session_options``): ``--threads`` intra-op threads
  (default 2) and no spinning: an idle ORT pool spins for a while after each run, and with two sessions in one
  process the pool of the model that just ran takes a core from the next one (on 2 cores it slowed whichever model
  came second by up to 1.6x, which flattered the slower model's ratio);
* throughput: both sessions in one process, interleaved rounds; the median round of each, and the median of the
  per-round ratios;
* peak memory: each model in a fresh process that imports only onnxruntime, its peak resident set (``VmHWM``)
  after one inference
  (model weights, ORT's arena and the input included; the process baseline is reported too);
* ``--profile``: ORT's per-operator profile of each model (each node's median over 3 runs), summed by op type
  (what dominates), and the cost of one elementwise pass of a few ops on one-op graphs (``op_ns_per_entry``).

  python tools/onnx_benchmark.py --batch 8 --rounds 10 --vitdet --profile --json benchmarks/onnx_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process by measure_memory: only onnxruntime and numpy imported, one session, one inference.
_MEMORY_PROBE = """
import json, sys, numpy as np, onnxruntime as ort
def hwm():  # the process's peak resident set in MiB (ru_maxrss would carry the parent's peak across exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
path, shape, threads = sys.argv[1], tuple(json.loads(sys.argv[2])), int(sys.argv[3])
base = hwm()
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
loaded = hwm()
session.run(None, {session.get_inputs()[0].name: np.random.randn(*shape).astype(np.float32)})
print(json.dumps({"baseline_mib": base, "loaded_mib": loaded, "peak_mib": hwm()}))
"""


def _timm_vit(name: str):
    import timm

    import karat  # noqa: F401  registers the KArAt models

    return timm.create_model(name, num_classes=1000).eval()


def _vitdet_backbone(config: str):
    from detectron2.config import LazyConfig, instantiate

    return instantiate(LazyConfig.load(str(ROOT / config)).model.backbone.net).eval()


def export(model, shape: Tuple[int, ...], path: Path, exporter: str) -> float:
    """Export ``model`` for inputs of ``shape`` (batch axis dynamic); returns the seconds it took."""
    import torch

    x = torch.randn(*shape)
    start = time.perf_counter()
    if exporter == "dynamo":
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return time.perf_counter() - start


def session_options(threads: int, profile_prefix: Optional[str] = None):
    """The ORT session options of every session here, the same for both models: ``threads`` intra-op threads, no
    spinning (see the module docstring), ORT's default graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def throughput(paths: Dict[str, Path], shape: Tuple[int, ...], rounds: int,
               threads: int) -> Tuple[Dict[str, float], float]:
    """Median seconds per inference of each model, in interleaved rounds (one warm-up run each first), and the
    median over rounds of softmax's time over KArAt's (the throughput ratio within each round)."""
    import onnxruntime as ort

    sessions = {k: ort.InferenceSession(str(p), session_options(threads), providers=["CPUExecutionProvider"])
                for k, p in paths.items()}
    x = np.random.randn(*shape).astype(np.float32)
    times: Dict[str, List[float]] = {k: [] for k in sessions}
    for r in range(rounds + 1):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: x})
            if r:
                times[k].append(time.perf_counter() - start)
    ratio = float(np.median(np.array(times["softmax"]) / np.array(times["karat"])))
    return {k: float(np.median(v)) for k, v in times.items()}, ratio


def measure_memory(path: Path, shape: Tuple[int, ...], threads: int) -> Dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), json.dumps(list(shape)), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(path: Path, shape: Tuple[int, ...], threads: int, runs: int = 3,
            top: int = 10) -> Dict[str, Dict[str, float]]:
    """Per op type: milliseconds an inference (each node's median over ``runs`` profiled runs after a warm-up) and
    its share of the profiled total, the ``top`` largest; ``total`` the sum over all op types."""
    import onnxruntime as ort

    options = session_options(threads, str(path.with_suffix("")))
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.randn(*shape).astype(np.float32)
    for _ in range(runs + 1):
        s.run(None, {s.get_inputs()[0].name: x})
    events = json.loads(Path(s.end_profiling()).read_text())
    per_node: Dict[str, List[float]] = {}
    op_of: Dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node.setdefault(e["name"], []).append(e["dur"] / 1e3)  # microseconds -> ms
            op_of[e["name"]] = e["args"]["op_name"]
    per_op: Counter = Counter()
    for name, durations in per_node.items():
        per_op[op_of[name]] += float(np.median(durations[1:] or durations))  # the first run is the warm-up
    total = sum(per_op.values())
    out = {op: {"ms": round(ms, 1), "share": round(ms / total, 3)} for op, ms in per_op.most_common(top)}
    out["total"] = {"ms": round(total, 1), "share": 1.0}
    return out


def op_costs(threads: int, entries: int = 1 << 20, repeats: int = 15) -> Dict[str, Dict[str, float]]:
    """Nanoseconds an entry of one-op graphs (``y = op(x)``, or ``x * x`` and ``x + x``) over ``entries`` fp32
    entries, at 1 and ``threads`` intra-op threads, median of ``repeats``: what an elementwise pass costs in ORT, and
    that ``Sin`` and ``Cos`` are evaluated one entry at a time on one thread."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = np.random.randn(entries).astype(np.float32) * 4
    out: Dict[str, Dict[str, float]] = {}
    for op in ("Sin", "Cos", "Mul", "Add", "Exp", "Tanh"):
        inputs = ["x", "x"] if op in ("Mul", "Add") else ["x"]
        graph = helper.make_graph([helper.make_node(op, inputs, ["y"])], op,
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [entries])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [entries])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model)
        out[op] = {}
        for n in sorted({1, threads}):
            s = ort.InferenceSession(model.SerializeToString(), session_options(n), providers=["CPUExecutionProvider"])
            s.run(None, {"x": x})
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                s.run(None, {"x": x})
                times.append(time.perf_counter() - start)
            out[op][f"{n} thread{'s' if n > 1 else ''}"] = round(float(np.median(times)) / entries * 1e9, 3)
    return out


def run_pair(label: str, models: Dict[str, Any], shape: Tuple[int, ...], args, tmp: Path) -> Dict[str, Any]:
    """Export both models, then time, measure and (optionally) profile them; ratios are KArAt / softmax."""
    paths = {k: tmp / f"{label}_{k}.onnx" for k in models}
    export_s = {k: round(export(m, shape, paths[k], args.exporter), 1) for k, m in models.items()}
    rounds = args.rounds if label == "vit_tiny" else args.vitdet_rounds
    seconds, ratio = throughput(paths, shape, rounds, args.threads)
    memory = {k: measure_memory(p, shape, args.threads) for k, p in paths.items()}
    row: Dict[str, Any] = {
        "input": list(shape), "rounds": rounds, "export_s": export_s,
        "ms_per_inference": {k: round(v * 1e3, 1) for k, v in seconds.items()},
        "throughput_ratio": round(ratio, 3),  # median over rounds of softmax's time / KArAt's
        "memory_mib": {k: {n: round(v, 1) for n, v in m.items()} for k, m in memory.items()},
        "peak_memory_ratio": round(memory["karat"]["peak_mib"] / memory["softmax"]["peak_mib"], 3),
        # the same without the process's baseline (Python, numpy, onnxruntime): model, arena and activations
        "peak_above_baseline_ratio": round((memory["karat"]["peak_mib"] - memory["karat"]["baseline_mib"])
                                           / (memory["softmax"]["peak_mib"] - memory["softmax"]["baseline_mib"]), 3),
    }
    if args.profile:
        row["profile"] = {k: profile(p, shape, args.threads) for k, p in paths.items()}
    return row


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds for ViT-Tiny")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    p.add_argument("--vitdet", action="store_true", help="also detectron2's ViTDet-T backbone at 1024 px")
    p.add_argument("--vitdet-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads, the same for both models")
    p.add_argument("--profile", action="store_true", help="ORT's per-op profile of each model")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    result: Dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__, "exporter": args.exporter,
                    "threads": args.threads, "load_average": [round(v, 2) for v in os.getloadavg()],
                    "date": time.strftime("%Y-%m-%d")},
        "cases": {}}
    if args.profile:
        result["op_ns_per_entry"] = op_costs(args.threads)
        print(json.dumps(result["op_ns_per_entry"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        vit = {"softmax": _timm_vit("vit_tiny_patch16_224"), "karat": _timm_vit("vit_tiny_patch16_224_karat")}
        result["cases"]["vit_tiny"] = run_pair("vit_tiny", vit, (args.batch, 3, 224, 224), args, Path(tmp))
        print(json.dumps(result["cases"]["vit_tiny"], indent=1), flush=True)
        if args.vitdet:
            nets = {"softmax": _vitdet_backbone("configs/COCO/mask_rcnn_vitdet_t_100ep.py"),
                    "karat": _vitdet_backbone("configs/COCO/mask_rcnn_vitdet_karat_t_100ep.py")}
            result["cases"]["vitdet_t_backbone"] = run_pair("vitdet_t", nets, (1, 3, 1024, 1024), args, Path(tmp))
            print(json.dumps(result["cases"]["vitdet_t_backbone"], indent=1), flush=True)
    result["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]  # other jobs on the machine
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    for label, row in result["cases"].items():
        print(f"{label}: throughput {row['throughput_ratio']}x softmax, peak memory {row['peak_memory_ratio']}x "
              f"({row['peak_above_baseline_ratio']}x above the process baseline)")
    return result


if __name__ == "__main__":
    main()
