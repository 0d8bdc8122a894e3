#!/usr/bin/env python
"""Train or evaluate a detectron2 lazy config (the project's ViTDet-KArAt configs, or any other) with detectron2's
trainer, hooks, checkpointer, evaluator and launcher, for users who installed detectron2 without its source tree.

It takes detectron2's standard arguments::

    python tools/lazyconfig_train.py --config-file configs/COCO/mask_rcnn_vitdet_karat_b_blockwise_100ep.py \
        --num-gpus 8 train.init_checkpoint=ckpt/vitdet_karat_b.pth
    python tools/lazyconfig_train.py --config-file ... --num-machines 2 --machine-rank 0 --dist-url tcp://host:port
    python tools/lazyconfig_train.py --config-file ... --eval-only train.init_checkpoint=output/model_final.pth
    python tools/lazyconfig_train.py --config-file ... --resume

Besides what detectron2's ``tools/lazyconfig_train_net.py`` does, it checks that the config has what training
needs, refuses ``--eval-only`` without a checkpoint, and writes the final metrics to
``<output_dir>/final_metrics.json`` (``--eval-only``: ``eval_metrics.json``).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the configs import detectron2_plugin from this checkout

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.engine import (  # noqa: E402
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.engine.defaults import create_ddp_model  # noqa: E402
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402
from detectron2.utils import comm  # noqa: E402

logger = logging.getLogger("detectron2")

REQUIRED = ("model", "dataloader", "optimizer", "lr_multiplier", "train")


def check_config(cfg: Any, path: str, eval_only: bool) -> None:
    """Fail early, naming the missing part, instead of deep inside instantiate()."""
    needed = ("model", "dataloader", "train") if eval_only else REQUIRED
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise ValueError(f"{path} lacks {missing}: a training config defines {list(REQUIRED)} "
                         f"(see configs/COCO/mask_rcnn_vitdet_b_100ep.py).")
    if eval_only and not cfg.train.get("init_checkpoint"):
        raise ValueError("--eval-only needs the weights to evaluate: add train.init_checkpoint=<path to a .pth>.")


def do_test(cfg: Any, model: Any) -> Optional[Dict[str, Any]]:
    """COCO-style evaluation of ``model`` on ``dataloader.test`` with ``dataloader.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return None
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(args: Any, cfg: Any) -> Optional[Dict[str, Any]]:
    """detectron2's training loop: (AMP)SimpleTrainer with the timer, LR-scheduler, checkpointer, eval and
    writer hooks. Returns the last evaluation's results."""
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    last: Dict[str, Any] = {}

    def evaluate() -> Optional[Dict[str, Any]]:
        results = do_test(cfg, model)
        if results is not None:
            last.clear()
            last.update(results)
        return results

    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, evaluate),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A resumed checkpoint stores the iteration that just finished.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return dict(last) or None


def main(args: Any) -> Optional[Dict[str, Any]]:
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    check_config(cfg, args.config_file, args.eval_only)
    default_setup(cfg, args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        results = do_test(cfg, model)
        name = "eval_metrics.json"
    else:
        results = do_train(args, cfg)
        name = "final_metrics.json"
    if results is not None and comm.is_main_process():
        out = Path(cfg.train.output_dir) / name
        out.write_text(json.dumps(results, indent=2, default=float))
        logger.info("Metrics written to %s", out)
    return results


def invoke_main(argv: Optional[list] = None) -> None:
    args = default_argument_parser().parse_args(argv)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
