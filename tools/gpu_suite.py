#!/usr/bin/env python
"""The GPU story in one command: environment, CUDA kernel tests, speed and memory, short real training runs.

Our GPU node comes for about 30 minutes at a time with a 10-minute limit per command, so every stage fits in
9 minutes on one H100 and the stages can run as separate commands into the same folder:

  python -m tools.gpu_suite --out benchmarks/gpu --stage env        # GPU, driver, torch, triton, CUDA, packages
  python -m tools.gpu_suite --out benchmarks/gpu --stage tests      # tests/test_gpu_fused.py (fused vs float64)
  python -m tools.gpu_suite --out benchmarks/gpu --stage bench      # attention layers and training steps, T/S/B
  python -m tools.gpu_suite --out benchmarks/gpu --stage pipelines  # classification (torchrun, NCCL), detectron2,
                                                                    # mmseg: short real runs with AMP
  python -m tools.gpu_suite --out DIR --cpu                         # every stage at toy sizes on the CPU (CI)

Each stage adds its results to ``DIR/suite.json`` and rewrites ``DIR/suite.md`` (one table per stage) from it;
logs go to ``DIR/logs/`` and the pipelines' own records (not their checkpoints) to ``DIR/runs/``: the folder is
ready to commit. A stage already in ``suite.json`` is refused unless ``--overwrite`` is given. The
benchmark stage runs ``tools/benchmark.py``'s cases (each in a fresh process); ``--cpu`` (``--device cpu --tiny``)
runs the fused kernels under ``TRITON_INTERPRET=1``. The exit status is 1 when a test, a pipeline or a
benchmark case (other than running out of memory) failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from tools import benchmark, host_ops

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "tests", "bench", "pipelines")
BUDGET_S = 9 * 60  # per stage on one H100


# ------------------------------------------------------------------------------------------------ helpers


def run_logged(cmd: List[str], log: Path, env: Optional[Dict[str, str]] = None, cwd: Path = ROOT,
               timeout: int = 540) -> Dict[str, Any]:
    """Run ``cmd`` with this checkout on PYTHONPATH, output to ``log``; returns status and seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    **(env or {}))
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        try:
            rc = subprocess.run(list(map(str, cmd)), cwd=cwd, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return dict(returncode=rc, seconds=round(time.time() - t0, 1), log=str(log),
                command=" ".join(map(str, cmd)))


def _version(module: str) -> Optional[str]:
    try:
        return getattr(__import__(module), "__version__", "?")
    except Exception:  # noqa: BLE001  any failure to import is reported as absent
        return None


# ------------------------------------------------------------------------------------------------ stages


def stage_env(opts: argparse.Namespace) -> Dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    env: Dict[str, Any] = dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(),
                               torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                               device=opts.device)
    for mod in ("triton", "timm", "numpy", "mmcv", "mmengine", "mmseg", "mmdet", "detectron2", "karat"):
        env[mod] = _version(mod)
    if opts.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no CUDA device; use --cpu for the CPU mode")
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True)
            env["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    env["commit"] = git.stdout.strip() if git.returncode == 0 else None
    return env


def stage_tests(opts: argparse.Namespace) -> Dict[str, Any]:
    """tests/test_gpu_fused.py through pytest; its per-case errors and tolerances come back as JSON."""
    errors_json, junit = opts.out / "fused_errors.json", opts.out / "tests-junit.xml"
    env = {"KARAT_GPU_TEST_REPORT": str(errors_json)}
    select: List[str] = []
    if opts.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
        if opts.tiny:  # one shape in the three dtypes, and the whole-model check: enough to catch a typo
            select = ["-k", "ragged or everything or universal or compile"]
    run = run_logged([sys.executable, "-m", "pytest", "tests/test_gpu_fused.py", "-m", "gpu", "-q", "-rfE",
                      "-p", "no:cacheprovider", f"--junitxml={junit}", *select], opts.out / "logs" / "tests.log",
                     env=env)
    text = Path(run["log"]).read_text()
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    result = dict(run, passed=counts.get("passed", 0), failed=counts.get("failed", 0) + counts.get("errors", 0)
                  + counts.get("error", 0), skipped=counts.get("skipped", 0))
    if errors_json.is_file():
        result["fused"] = json.loads(errors_json.read_text())
    result["ok"] = run["returncode"] == 0 and result["passed"] > 0
    return result


def stage_bench(opts: argparse.Namespace) -> Dict[str, Any]:
    """tools/benchmark.py's cases: softmax (SDPA) vs KArAt fused / efficient / reference, per layer, per whole
    model, and in the hosts' own models (ViTDet, Swin) against their softmax; each row names the path that served
    it. On CUDA every case runs in this process (no process start per case); each result is also appended to
    ``DIR/logs/bench.jsonl`` as it comes, so a stage cut short keeps what it measured."""
    impls = opts.impls or ["softmax", "fused", "efficient", "reference"]
    if opts.tiny:  # toy sizes: every code path once
        attention = benchmark.make_cases("attention", ["tiny"], [17], 2, impls, None, opts.device, 1, 0)
        model = benchmark.make_cases("model", ["tiny"], [197], 1, ["softmax", "efficient"], None, opts.device, 1, 0)
        host = benchmark.make_cases("host", ["swin"], [], 1, ["softmax", "auto"], None, opts.device, 1, 0)
        compiled = []
    else:  # per layer at 224, 512 and 1024 px (ViTDet-B's global blocks: base at N = 4096, batch 1), a Swin-T
        # 7 x 7 window layer (N = 49, the 512 windows of a batch of 8 at stage 1: fused is the whole-window kernels),
        # the whole-model training step at batch 32, and the hosts' models at batch 8 (ViTDet-T at 512 px, Swin-T
        # at 224 px)
        sizes = ["tiny", "small", "base"]
        attention = [c for n, batch in ((197, 32), (1025, 8), (4096, 1), (49, 512))
                     for c in benchmark.make_cases("attention", sizes, [n], batch, impls, None, opts.device, 10, 3)]
        model = benchmark.make_cases("model", sizes, [197], 32, impls, None, opts.device, 10, 3)
        compiled = compiled_cases(opts.device)
        # fused and reference as well as auto: where the Triton path's small-window crossover lies (Swin's 49 keys)
        host = benchmark.make_cases("host", ["vitdet", "swin"], [], 8, ["softmax", "auto", "fused", "reference"],
                                    None, opts.device, 10, 3)
    if opts.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # inherited by benchmark.py's case processes
    partial = opts.out / "logs" / "bench.jsonl"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("")

    def keep(result: Dict[str, Any]) -> None:
        with open(partial, "a") as f:
            f.write(json.dumps(result) + "\n")

    t0 = time.time()
    results = benchmark.run_rounds(attention + model + host + compiled, rounds=1, in_process=opts.device == "cuda",
                                   on_result=keep)
    failed = [r for r in results if "error" in r and "out of memory" not in r["error"].lower()]
    # the host's share of a layer step (tools/host_ops.py): ops and launches beside the kernels, and the step's time
    # where the arithmetic is negligible (N = 16) and at ViT-Tiny's training shape
    host_ops_rows = [] if opts.tiny else [host_ops.measure(path, tokens=n, batch=b, device=opts.device, repeat=50)
                                          for n, b in ((16, 1), (197, 32)) for path in ("softmax", "fused")]
    return dict(meta=benchmark.environment(opts.device), seconds=round(time.time() - t0, 1),
                attention=[r for r in results if r["level"] == "attention"],
                model=[r for r in results if r["level"] == "model"],
                host=[r for r in results if r["level"] == "host"], host_ops=host_ops_rows, ok=not failed)


def compiled_cases(device: str) -> List[Dict[str, Any]]:
    """Last in the bench stage (they compile for minutes): the ViT training step under ``torch.compile`` (Inductor),
    in its default mode and with CUDA graphs (``reduce-overhead``), softmax and KArAt alike, at the widths where the
    host's per-op cost dominates. Each mode's rows have their own ratios to softmax compiled the same way."""
    return [case for mode in (None, "reduce-overhead")
            for case in benchmark.make_cases("model", ["tiny", "small"], [197], 32, ["softmax", "fused"], None, device,
                                             10, 3, compile_backend="inductor", compile_mode=mode)]


def make_image_folder(root: Path, classes: int, train_per_class: int, val_per_class: int, size: int) -> Path:
    """An ImageNet-layout tree (``train/<class>/*.png``, ``val/<class>/*.png``) whose classes differ in colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            base = np.array([(37 * c) % 256, (91 * c) % 256, (151 * c) % 256], dtype=np.float32)
            for i in range(count):
                img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:05d}.png")
    return root


def _last_json_line(path: Path, key: Optional[str] = None) -> Dict[str, Any]:
    """The last JSON line of a log (the last one holding ``key``, if given); {} when there is none."""
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    lines = [rec for rec in lines if key is None or key in rec]
    return lines[-1] if lines else {}


def pipeline_classification(opts: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """classification.main under torchrun (NCCL on CUDA, gloo on the CPU), AMP, one epoch."""
    if opts.tiny:
        data = make_image_folder(work / "imagenet", classes=2, train_per_class=8, val_per_class=4, size=32)
        args = ["--input-size", "32", "--batch-size", "8", "--num_workers", "0", "--grid", "2", "--hidden_dim", "4",
                "--aa", "", "--reprob", "0", "--mixup", "0", "--cutmix", "0"]
    else:  # 9,600 images at batch 32: 300 steps of ViT-Tiny at 224 px (N = 197, fused kernels)
        data = make_image_folder(work / "imagenet", classes=10, train_per_class=960, val_per_class=50, size=64)
        args = ["--input-size", "224", "--batch-size", "32", "--num_workers", "8", "--grid", "3", "--hidden_dim", "12"]
    out = work / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "main.py",
           "--model", "vit_tiny_patch16_224_karat", "--data-set", "IMNET", "--data-path", str(data), "--epochs", "1",
           "--warmup-epochs", "0", "--device", opts.device, "--amp", str(opts.device == "cuda"),
           "--output_dir", str(out), *args]
    run = run_logged(cmd, opts.out / "logs" / "classification.log")
    last = _last_json_line(out / "log.txt")
    steps = len(list((data / "train").glob("*/*.png"))) // int(args[args.index("--batch-size") + 1])
    return dict(run, steps=steps, metrics={k: last.get(k) for k in ("train_loss", "test_acc1", "epoch_seconds")},
                ok=run["returncode"] == 0 and bool(last))


def pipeline_detectron2(opts: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """tools/lazyconfig_train.py on the embedded shapes config: 50 iterations with AMP on CUDA."""
    from detectron2_plugin.data import ShapesSpec, generate_shapes

    data = generate_shapes(work / "shapes", ShapesSpec(num_train=16 if opts.tiny else 160,
                                                       num_val=4 if opts.tiny else 40))
    iters = 2 if opts.tiny else 50
    out = work / "run"
    small = (["model.backbone.net.depth=2", "model.backbone.net.window_block_indexes=[0]",
              "model.backbone.net.embed_dim=48", "dataloader.train.total_batch_size=2"] if opts.tiny else [])
    cmd = [sys.executable, "tools/lazyconfig_train.py", "--config-file",
           "configs/shapes/mask_rcnn_vitdet_karat_t_shapes.py", f"train.device={opts.device}",
           f"train.amp.enabled={opts.device == 'cuda'}", f"train.max_iter={iters}", f"train.eval_period={iters}",
           f"train.checkpointer.period={iters}", f"train.log_period={1 if opts.tiny else 10}",
           f"train.output_dir={out}", *small]
    run = run_logged(cmd, opts.out / "logs" / "detectron2.log", env={"KARAT_SHAPES_ROOT": str(data)})
    final = json.loads((out / "final_metrics.json").read_text()) if (out / "final_metrics.json").is_file() else {}
    last = _last_json_line(out / "metrics.json", "total_loss")
    metrics = dict(iterations=iters, total_loss=last.get("total_loss"), time_per_iter=last.get("time"),
                   bbox_AP=final.get("bbox", {}).get("AP"), segm_AP=final.get("segm", {}).get("AP"))
    return dict(run, metrics=metrics, ok=run["returncode"] == 0 and bool(final))


def pipeline_mmseg(opts: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """mmseg's own tools/train.py on the embedded ADE20K-layout config: 60 iterations with AMP on CUDA."""
    import mmseg

    from mmseg_configs.data import make_embedded_ade20k

    train = Path(mmseg.__file__).parent / ".mim" / "tools" / "train.py"
    data = make_embedded_ade20k(work / "ade", num_train=8 if opts.tiny else 32, num_val=4 if opts.tiny else 8)
    iters = 2 if opts.tiny else 60
    options = [f"train_dataloader.dataset.data_root={data}", f"val_dataloader.dataset.data_root={data}",
               f"test_dataloader.dataset.data_root={data}", f"train_cfg.max_iters={iters}",
               f"train_cfg.val_interval={iters}", f"default_hooks.checkpoint.interval={iters}",
               f"default_hooks.logger.interval={1 if opts.tiny else 10}"]
    if opts.tiny:
        options += ["train_dataloader.batch_size=2", "model.backbone.num_layers=4", "model.backbone.embed_dims=48",
                    "model.backbone.out_indices=[0,1,2,3]", "model.neck.in_channels=[48,48,48,48]",
                    "model.backbone.hidden_dim=4", "model.backbone.grid=2"]
    work_dir = work / "run"
    cmd = [sys.executable, "-W", "ignore", str(train),
           str(ROOT / "mmseg_configs" / "upernet" / "upernet_vit-t2-karat_1xb8-60iter_embedded-16x16.py"),
           "--work-dir", str(work_dir), *(["--amp"] if opts.device == "cuda" else []), "--cfg-options", *options]
    env = {} if opts.device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}
    run = run_logged(cmd, opts.out / "logs" / "mmseg.log", env=env, cwd=work)
    text = Path(run["log"]).read_text()
    miou = re.findall(r"Iter\(val\).*?mIoU: ([\d.]+)", text)
    losses = re.findall(r"Iter\(train\).*?\bloss: ([\d.]+)", text)
    metrics = dict(iterations=iters, mIoU=float(miou[-1]) if miou else None,
                   loss=float(losses[-1]) if losses else None)
    return dict(run, metrics=metrics, ok=run["returncode"] == 0 and bool(miou))


def keep_text(run: Path, dest: Path) -> None:
    """The small text records of a run (logs, metrics, configs) into ``dest``, each content once (mmengine writes
    its config twice); checkpoints stay behind."""
    seen = set()
    for f in sorted(run.rglob("*")) if run.is_dir() else []:
        if f.is_file() and f.suffix in (".txt", ".json", ".log", ".yaml", ".py") and f.stat().st_size < 2 ** 20:
            if f.read_bytes() in seen:
                continue
            seen.add(f.read_bytes())
            target = dest / f.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)


def stage_pipelines(opts: argparse.Namespace) -> Dict[str, Any]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="karat-gpu-suite-") as tmp:
        for name, fn in (("classification", pipeline_classification), ("detectron2", pipeline_detectron2),
                         ("mmseg", pipeline_mmseg)):
            shutil.rmtree(opts.out / "runs" / name, ignore_errors=True)  # this stage's own output, re-run
            work = Path(tmp) / name
            work.mkdir()
            try:
                results[name] = fn(opts, work)
            except Exception as e:  # noqa: BLE001  one broken pipeline must not hide the others' results
                results[name] = dict(ok=False, error=f"{type(e).__name__}: {e}")
            keep_text(work / "run", opts.out / "runs" / name)
            print(f"[gpu_suite]   {name}: {'ok' if results[name]['ok'] else 'FAILED'} "
                  f"({results[name].get('seconds', '-')} s)", flush=True)
    return dict(results, ok=all(r["ok"] for r in results.values()))


RUNNERS: Dict[str, Callable[[argparse.Namespace], Dict[str, Any]]] = dict(
    env=stage_env, tests=stage_tests, bench=stage_bench, pipelines=stage_pipelines)


# ------------------------------------------------------------------------------------------------ report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown(suite: Dict[str, Any]) -> str:
    """One table per stage, from suite.json."""
    lines = ["# KArAt GPU suite", ""]
    meta = suite.get("meta", {})
    lines += [f"Command(s): {'; '.join(f'`{c}`' for c in meta.get('commands', []))}", ""]
    if "env" in suite:
        env = suite["env"]["result"]
        lines += ["## Environment", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in env.items()] + [""]
    if "tests" in suite:
        t = suite["tests"]["result"]
        lines += ["## Fused kernels vs float64 reference (tests/test_gpu_fused.py)", "",
                  f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('skipped', 0)} skipped "
                  f"in {t.get('seconds')} s. Error: max |fused - ref64| / max |ref64| per tensor (forward and every "
                  "gradient), worst tensor shown.", ""]
        fused = t.get("fused") or {}
        if fused.get("cases"):
            lines += [f"Device: {fused.get('device')}{' (Triton interpreter)' if fused.get('interpreted') else ''}; "
                      f"tolerances: {fused.get('tolerance')}", "",
                      "| variant (kernels) | dtype | B, H, N, d | G | r | options, inputs | worst error | tensor "
                      "| tolerance |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for c in fused["cases"]:
                worst = max(c["errors"], key=c["errors"].get)
                options = ", ".join(f"{k}={v}" for k, v in (c.get("options") or {}).items()) or "-"
                variant = c["variant"] + (f" ({c['kernel']})" if c.get("kernel") else "")
                lines.append(f"| {variant} | {c['dtype']} | {', '.join(map(str, c['shape']))} | {c['grid']} | "
                             f"{c['rank']} | {options} | {c['errors'][worst]:.2e} | {worst} | {c['tolerance']:g} |")
            lines.append("")
        if fused.get("compiled"):
            comp = fused["compiled"]
            dims, grids = sorted({c["D"] for c in comp}), sorted({c["G"] for c in comp})
            lines += [f"Compiled by Triton for {comp[0]['arch']} (without launching): {len(comp)} kernels "
                      f"(forward, dq, dk at head_dim {dims}, G {grids}, {sorted({c['dtype'] for c in comp})}), "
                      f"at most {max(c['shared_bytes'] for c in comp)} bytes of shared memory.", ""]
    if "bench" in suite:
        b = suite["bench"]["result"]
        for key, title in (("attention", "Attention layer, forward + backward"),
                           ("model", "Whole-model training step (224 px)"),
                           ("host", "Hosts' models, forward + backward, against the host's own softmax model")):
            if b.get(key):
                lines += [f"## {title}", "", benchmark.table(b[key]), ""]
        if b.get("host_ops"):
            lines += ["## Host cost of one layer step (ViT-Tiny width, tools/host_ops.py)", "",
                      host_ops.table(b["host_ops"]), ""]
    if "pipelines" in suite:
        p = suite["pipelines"]["result"]
        lines += ["## Pipelines", "", "| pipeline | status | seconds | metrics | log |", "|---|---|---|---|---|"]
        for name, r in p.items():
            if isinstance(r, dict):
                metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("metrics") or {}).items())
                if r.get("steps"):
                    metrics = f"steps {r['steps']}, " + metrics
                lines.append(f"| {name} | {'ok' if r.get('ok') else 'FAILED ' + r.get('error', '')} | "
                             f"{_fmt(r.get('seconds'))} | {metrics} | {Path(r.get('log', '-')).name} |")
        lines.append("")
    for name in STAGES:
        if name in suite:
            lines.append(f"- stage `{name}`: {suite[name]['seconds']} s, {'ok' if suite[name]['ok'] else 'FAILED'}")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results folder (suite.json, suite.md, logs/)")
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes for every stage")
    p.add_argument("--cpu", "--dry-run", action="store_true", dest="cpu", help="the same as --device cpu --tiny")
    p.add_argument("--overwrite", action="store_true", help="replace a stage's results already in --out")
    p.add_argument("--impls", nargs="+", choices=benchmark.IMPLS, default=None,
                   help="the bench stage's implementations (default: softmax fused efficient reference)")
    opts = p.parse_args(argv)
    if opts.cpu:
        opts.device, opts.tiny = "cpu", True
    opts.out = opts.out.resolve()
    opts.out.mkdir(parents=True, exist_ok=True)
    suite_json = opts.out / "suite.json"
    suite = json.loads(suite_json.read_text()) if suite_json.is_file() else {}
    stages = list(STAGES) if opts.stage == "all" else [opts.stage]
    done = [s for s in stages if s in suite]
    if done and not opts.overwrite:
        p.error(f"{suite_json} already holds stage(s) {done}; pass --overwrite or choose another --out")
    if suite.get("meta", {}).get("device", opts.device) != opts.device:
        p.error(f"{suite_json} holds results for device {suite['meta']['device']}; use another --out")
    suite.setdefault("meta", dict(device=opts.device, tiny=opts.tiny, commands=[]))
    command = " ".join(argv if argv is not None else sys.argv[1:])
    suite["meta"]["commands"].append(f"python -m tools.gpu_suite {command}")

    ok = True
    for name in stages:
        print(f"[gpu_suite] stage {name} ...", flush=True)
        t0 = time.time()
        result = RUNNERS[name](opts)
        seconds = round(time.time() - t0, 1)
        stage_ok = result.get("ok", True)
        suite[name] = dict(result=result, seconds=seconds, ok=stage_ok, date=time.strftime("%Y-%m-%d %H:%M:%S"))
        ok &= stage_ok
        write_atomic(suite_json, json.dumps(suite, indent=1) + "\n")
        write_atomic(opts.out / "suite.md", markdown(suite))
        over = " (over the 9-minute budget)" if seconds > BUDGET_S and opts.device == "cuda" else ""
        print(f"[gpu_suite] stage {name}: {'ok' if stage_ok else 'FAILED'} in {seconds} s{over}", flush=True)
    print(f"[gpu_suite] results: {opts.out / 'suite.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
