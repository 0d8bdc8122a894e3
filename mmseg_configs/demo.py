"""The demo's segmentation stage: classification backbones -> UperNet, fine-tuned on CPU with mmseg's runner.

For each classification checkpoint of the demo (``karat`` and ``softmax``: ViT-Tiny bodies with patch 2 on
8 x 8 grey digits, 4 x 4 tokens, no class token) the converter writes an mmseg backbone checkpoint for 16 x 16
RGB inputs (8 x 8 tokens: position embeddings and KArAt operators resampled, the grey patch embedding
replicated to RGB), the embedded config (``upernet/upernet_vit-t2-karat_1xb8-60iter_embedded-16x16.py``)
loads it (``load_from``), and mmseg's ``Runner`` fine-tunes and evaluates (IoUMetric) on
the generated ADE20K-layout set. Both backbones get the same data, schedule and seed.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .data import make_embedded_ade20k

CONFIG = Path(__file__).resolve().parent / "upernet" / "upernet_vit-t2-karat_1xb8-60iter_embedded-16x16.py"
IMAGE_SIZE = (16, 16)
NAMES = ("karat", "softmax")


def _out_indices(depth: int) -> List[int]:
    """Four evenly spaced layers ending with the last (2, 5, 8, 11 for 12 layers), as mmseg's ViT configs."""
    if depth < 4:
        raise ValueError(f"The UperNet of the segmentation stage takes 4 backbone layers; this ViT has {depth}.")
    return [max(0, round(depth * (i + 1) / 4) - 1) for i in range(4)]


def build_config(backbone_ckpt: Path, work_dir: Path, data_root: Path, quick: bool = False, seed: int = 0):
    """The embedded config with the backbone a converted checkpoint fits (its ``meta`` says which)."""
    from mmengine.config import Config

    from karat.checkpoint import load_checkpoint

    meta = load_checkpoint(backbone_ckpt)["meta"]["backbone"]
    backbone = {k: v for k, v in meta.items() if k not in ("karat_cfg", "out_indices")}
    if meta.get("karat_cfg"):
        backbone["karat_cfg"] = dict(meta["karat_cfg"])
    backbone.update(out_indices=_out_indices(meta["num_layers"]), drop_path_rate=0.0)
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone = backbone
    cfg.model.neck.in_channels = [meta["embed_dims"]] * 4
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = str(data_root)
    cfg.load_from = str(backbone_ckpt)  # backbone.* keys; mmseg's softmax ViT and the KArAt one alike
    cfg.work_dir = str(work_dir)
    cfg.randomness = dict(seed=seed, deterministic=False)
    cfg.log_level = "WARNING"
    cfg.visualizer.name = f"visualizer_{work_dir.name}_{time.time_ns()}"  # one per runner in this process
    if quick:
        cfg.train_cfg.max_iters = 2
        cfg.train_cfg.val_interval = 2
        cfg.default_hooks.checkpoint.interval = 2
        cfg.param_scheduler = [dict(type="ConstantLR", factor=1.0, by_epoch=False, begin=0, end=2)]
    return cfg


def run_stage(out_dir: Path, checkpoints: Dict[str, Path], quick: bool = False) -> List[Dict[str, Any]]:
    """Convert, fine-tune and evaluate each given backbone (``karat``, ``softmax``); one row per backbone with
    name, mIoU, aAcc (percent, mmseg's IoUMetric on the validation split) and seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models, many small ops: thread synchronisation costs more than it gains
    try:
        return _run_stage(Path(out_dir), checkpoints, quick)
    finally:
        torch.set_num_threads(threads)


def _run_stage(out_dir: Path, checkpoints: Dict[str, Path], quick: bool) -> List[Dict[str, Any]]:
    from mmengine.runner import Runner

    from .export import convert_classifier

    unknown = sorted(set(checkpoints) - set(NAMES))
    if unknown:
        raise ValueError(f"Unknown backbone name(s) {unknown}; the segmentation stage takes {list(NAMES)}.")
    data_root = make_embedded_ade20k(out_dir / "data", num_train=8 if quick else 48, num_val=4 if quick else 16,
                                     size=IMAGE_SIZE)
    rows: List[Dict[str, Any]] = []
    for name in [n for n in NAMES if n in checkpoints]:
        start = time.time()
        work_dir = out_dir / name
        backbone_ckpt = work_dir / "backbone_16x16.pth"
        # the stage's own output from an earlier run is replaced; nothing outside out_dir/<name> is written
        report = convert_classifier(str(checkpoints[name]), backbone_ckpt, img_size=IMAGE_SIZE, with_cls_token=False,
                                    in_channels=3, overwrite=True)
        runner = Runner.from_cfg(build_config(backbone_ckpt, work_dir, data_root, quick=quick))
        runner.train()
        metrics: Optional[Dict[str, float]] = runner.val_loop.run()
        rows.append(dict(name=name, mIoU=float(metrics["mIoU"]), aAcc=float(metrics["aAcc"]),
                         seconds=round(time.time() - start, 1), iterations=runner.iter,
                         transfer=f"{len(report.loaded)} loaded, {len(report.resampled)} resampled, "
                                  f"{len(report.new)} new"))
    return rows


def summary_table(rows: List[Dict[str, Any]]) -> str:
    """The stage's rows as a markdown table (``make demo`` prints it next to the other stages')."""
    lines = ["| backbone | mIoU | aAcc | iterations | seconds | transfer |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['mIoU']:.2f} | {r['aAcc']:.2f} | {r['iterations']} | {r['seconds']:.1f} | "
              f"{r['transfer']} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m mmseg_configs.demo OUT_DIR karat=CKPT softmax=CKPT [--quick]
    import sys

    args = [a for a in sys.argv[1:] if a != "--quick"]
    if not args:
        sys.exit("usage: python -m mmseg_configs.demo OUT_DIR karat=CKPT softmax=CKPT [--quick]")
    ckpts = dict(a.split("=", 1) for a in args[1:])
    print(summary_table(run_stage(Path(args[0]), {k: Path(v) for k, v in ckpts.items()}, quick="--quick" in sys.argv)))
