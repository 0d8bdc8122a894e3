"""detectron2's lazy-config training loop as library functions (what ``tools/lazyconfig_train.py`` runs and the
demo calls): detectron2's trainer (AMPTrainer/SimpleTrainer), hooks, DetectionCheckpointer (weights only; pickled
``.pkl`` files only with ``--allow-pickle``), COCO evaluation via ``inference_on_dataset``. Besides detectron2's
own ``tools/lazyconfig_train_net.py`` it checks the config first, refuses ``--eval-only`` without weights, and
writes the final metrics as JSON in the output folder.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from .checkpoint import SafeDetectionCheckpointer

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
    if not eval_only and cfg.train.get("amp", {}).get("enabled") and "cuda" not in str(cfg.train.get("device", "")):
        raise ValueError(f"train.amp.enabled=True needs CUDA but train.device={cfg.train.get('device')!r}: "
                         "detectron2's AMPTrainer autocasts with torch.cuda.amp and asserts CUDA. On a CPU, add "
                         "train.amp.enabled=False.")


def allow_pickle(args: Any) -> bool:
    """``--allow-pickle``: detectron2's pickled ``.pkl`` init checkpoints may load (they can run code)."""
    return bool(getattr(args, "allow_pickle", False))


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
    checkpointer = SafeDetectionCheckpointer(model, cfg.train.output_dir, allow_pickle=allow_pickle(args),
                                             trainer=trainer)
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
        SafeDetectionCheckpointer(model, allow_pickle=allow_pickle(args)).load(cfg.train.init_checkpoint)
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
