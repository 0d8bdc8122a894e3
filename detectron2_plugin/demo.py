"""Demo stage 2: the digits classifiers of stage 1 as ViTDet Mask R-CNN backbones on the embedded shapes set.

For each classifier ("karat" and "softmax"), on the CPU: convert its checkpoint into the shapes config's backbone
(tools/convert_to_detectron2.py's code: windows of 4 x 4 = 16 tokens take the KArAt operators as trained, global
blocks of 16 x 16 tokens get them resampled, the grayscale patch embedding becomes RGB), fine-tune with detectron2's
trainer, evaluate with detectron2's COCOEvaluator, and report box AP and mask AP.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "karat": ROOT / "configs" / "shapes" / "mask_rcnn_vitdet_karat_t_shapes.py",
    "softmax": ROOT / "configs" / "shapes" / "mask_rcnn_vitdet_t_shapes.py",
}


def _settings(quick: bool) -> Dict[str, Any]:
    """Dataset size and schedule: the full stage fits ~4 minutes on 2 cores for both backbones."""
    from .data import ShapesSpec

    if quick:
        return dict(spec=ShapesSpec(num_train=16, num_val=4), iters=2, batch=2)
    return dict(spec=ShapesSpec(num_train=160, num_val=40), iters=70, batch=4)


def _ap(results: Mapping[str, Any], task: str, metric: str = "AP") -> float:
    value = results.get(task, {}).get(metric, float("nan")) if results else float("nan")
    return float(value)


def finetune(name: str, checkpoint: Path, run_dir: Path, iters: int, batch: int) -> Dict[str, Any]:
    """Convert, train and evaluate one backbone; returns its row."""
    from detectron2.config import LazyConfig
    from detectron2.utils.env import seed_all_rng

    from .convert import convert_file
    from .train_net import do_train

    start = time.time()
    config = CONFIGS[name]
    run_dir.mkdir(parents=True, exist_ok=False)
    init = run_dir / "backbone_init.pth"
    conversion = convert_file(str(checkpoint), str(config), init)
    (run_dir / "transfer_report.txt").write_text(conversion.describe() + "\n")
    overrides = [f"train.init_checkpoint={init}", f"train.output_dir={run_dir}", f"train.max_iter={iters}",
                 f"train.eval_period={iters}", f"train.checkpointer.period={iters + 1}",
                 f"train.log_period={max(iters // 4, 1)}",
                 f"dataloader.train.total_batch_size={batch}"]
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(config)), overrides)
    LazyConfig.save(cfg, str(run_dir / "config.yaml"))
    seed_all_rng(0)
    torch.manual_seed(0)
    with open(run_dir / "stdout.txt", "w") as log, contextlib.redirect_stdout(log):  # pycocotools' tables
        results = do_train(_Args(), cfg) or {}
    (run_dir / "final_metrics.json").write_text(json.dumps(results, indent=2, default=float))
    return dict(name=name, box_ap=_ap(results, "bbox"), mask_ap=_ap(results, "segm"),
                box_ap50=_ap(results, "bbox", "AP50"), mask_ap50=_ap(results, "segm", "AP50"),
                seconds=round(time.time() - start, 1), iterations=iters, batch_size=batch,
                loaded=len(conversion.report.loaded), resampled=len(conversion.report.resampled),
                new=len(conversion.report.new), output_dir=str(run_dir))


class _Args:
    """The two command-line flags ``do_train`` reads."""

    resume = False
    eval_only = False


def summary_table(rows: List[Dict[str, Any]]) -> str:
    def fmt(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.1f}"

    lines = ["| backbone | box AP | mask AP | box AP50 | mask AP50 | iterations | seconds |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {fmt(r['box_ap'])} | {fmt(r['mask_ap'])} | {fmt(r['box_ap50'])} | "
              f"{fmt(r['mask_ap50'])} | {r['iterations']} | {r['seconds']} |" for r in rows]
    return "\n".join(lines)


def run_stage(out_dir: Path, checkpoints: Dict[str, Path], quick: bool = False) -> List[Dict[str, Any]]:
    """Fine-tune each classifier checkpoint (names ``karat`` / ``softmax``) as a ViTDet Mask R-CNN backbone on the
    shapes set; writes everything under ``out_dir`` and returns one row per backbone (name, box AP, mask AP,
    seconds, ...)."""
    from .data import ensure_shapes, register_shapes

    unknown = sorted(set(checkpoints) - set(CONFIGS))
    if unknown:
        raise ValueError(f"No detection config for {unknown}; the demo's backbones are {sorted(CONFIGS)}.")
    settings = _settings(quick)
    stage_dir = Path(out_dir)
    root = ensure_shapes(stage_dir / "shapes", settings["spec"])
    register_shapes(root)
    # detectron2's per-iteration logs and fvcore's list of head tensors missing from the backbone checkpoint (all
    # of them, by design) would drown the demo's output: the run folders keep the metrics and transfer reports.
    loggers = {name: logging.getLogger(name) for name in ("detectron2", "fvcore")}
    levels, threads = {name: lg.level for name, lg in loggers.items()}, torch.get_num_threads()
    loggers["detectron2"].setLevel(logging.WARNING)
    loggers["fvcore"].setLevel(logging.ERROR)
    # One intra-op thread: these small matrices gain little from two, and on a shared 2-core machine OpenMP's
    # spinning threads made a training step ~10x slower (measured: 19 s vs 1.7 s per step under load).
    torch.set_num_threads(1)
    rows = []
    try:
        for name in ("karat", "softmax"):
            if name in checkpoints:
                rows.append(finetune(name, Path(checkpoints[name]), stage_dir / name, settings["iters"],
                                     settings["batch"]))
    finally:
        for name, lg in loggers.items():
            lg.setLevel(levels[name])
        torch.set_num_threads(threads)
    (stage_dir / "summary.md").write_text(summary_table(rows) + "\n")
    (stage_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    return rows
