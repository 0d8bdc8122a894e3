"""The demo's segmentation stage: classification backbones -> UperNet, fine-tuned on CPU with mmseg's runner.

For each classification checkpoint of the demo (``karat`` and ``softmax``: ViT-Tiny bodies with patch 2 on
8 x 8 grey digits, 4 x 4 tokens, no class token) the converter writes an mmseg backbone checkpoint for 16 x 16
RGB inputs (8 x 8 tokens: position embeddings and KArAt operators resampled, the grey patch embedding
replicated to RGB) and prints its transfer report (what was loaded, resampled, newly initialised), the embedded
config (``upernet/upernet_vit-t2-karat_1xb8-60iter_embedded-16x16.py``) builds the UperNet, the backbone takes that
checkpoint strictly (:class:`LoadBackbone`: not ``load_from``, whose non-strict load of a whole segmentor lists every
neck and head tensor as missing), and mmseg's ``Runner`` fine-tunes and evaluates (IoUMetric) on the generated
ADE20K-layout set. Both backbones get the same data, schedule and seed.

The stage writes, under its (new or empty) output folder: ``data/`` (the generated set), and per backbone
``<name>/`` with ``transfer_report.txt``, ``backbone_16x16.pth``, mmseg's work dir (config, logs, checkpoints,
TensorBoard) and ``metrics.json``; ``summary.md`` / ``summary.json`` hold the table of both.

    python tools/demo.py --no-transfer --output-dir outputs/digits      # stage 1: the two classifiers
    python -m mmseg_configs.demo outputs/seg --from-demo outputs/digits # this stage on them
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

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
    cfg.load_from = None  # the backbone's weights come from LoadBackbone (run_stage)
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


def _hook_base() -> type:
    from mmengine.hooks import Hook

    return Hook


class LoadBackbone(_hook_base()):
    """Before training, the converted checkpoint's ``backbone.`` tensors into the segmentor's backbone, strictly: every
    backbone tensor is there (the converter checked it and its report, printed, says what was loaded and what is
    new), and no neck or head tensor is expected. mmengine's ``load_from`` would load them into the whole segmentor
    non-strictly and print every neck and decode-head tensor as "missing keys in source state_dict"."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = Path(checkpoint)

    def before_train(self, runner) -> None:  # after the runner's weight initialisation, as load_from would be
        from mmengine.model import is_model_wrapper

        from karat.checkpoint import load_checkpoint

        from .convert import backbone_state

        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        model.backbone.load_state_dict(backbone_state(load_checkpoint(self.checkpoint), str(self.checkpoint)))


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
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"Output folder {out_dir} already exists and is not empty; the stage never overwrites "
                              f"results. Give another folder or remove that one yourself.")
    missing = {n: str(c) for n, c in checkpoints.items() if not Path(c).is_file()}
    if missing:
        raise FileNotFoundError(f"Classification checkpoint(s) not found: {missing}. The demo's classification "
                                f"stage writes <demo output>/classification/<karat|softmax>/checkpoint.pth "
                                f"(python tools/demo.py --no-transfer --output-dir DIR).")
    data_root = make_embedded_ade20k(out_dir / "data", num_train=8 if quick else 48, num_val=4 if quick else 16,
                                     size=IMAGE_SIZE)
    rows: List[Dict[str, Any]] = []
    for name in [n for n in NAMES if n in checkpoints]:
        start = time.time()
        work_dir = out_dir / name
        backbone_ckpt = work_dir / "backbone_16x16.pth"
        work_dir.mkdir(parents=True)
        report = convert_classifier(str(checkpoints[name]), backbone_ckpt, img_size=IMAGE_SIZE, with_cls_token=False,
                                    in_channels=3)
        (work_dir / "transfer_report.txt").write_text(f"source: {checkpoints[name]}\n{report}\n")
        print(f"{name}: {checkpoints[name]} -> {backbone_ckpt}\n{report}", flush=True)
        runner = Runner.from_cfg(build_config(backbone_ckpt, work_dir, data_root, quick=quick))
        runner.register_hook(LoadBackbone(backbone_ckpt), priority="VERY_HIGH")
        runner.train()
        metrics: Optional[Dict[str, float]] = runner.val_loop.run()
        rows.append(dict(name=name, mIoU=float(metrics["mIoU"]), aAcc=float(metrics["aAcc"]),
                         seconds=round(time.time() - start, 1), iterations=runner.iter,
                         transfer=f"{len(report.loaded)} loaded, {len(report.resampled)} resampled, "
                                  f"{len(report.new)} new", output_dir=str(work_dir)))
        (work_dir / "metrics.json").write_text(json.dumps(rows[-1], indent=2))
    (out_dir / "summary.md").write_text(summary_table(rows) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    return rows


def summary_table(rows: List[Dict[str, Any]]) -> str:
    """The stage's rows as a markdown table (``make demo`` prints it next to the other stages')."""
    lines = ["| backbone | mIoU | aAcc | iterations | seconds | transfer |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['mIoU']:.2f} | {r['aAcc']:.2f} | {r['iterations']} | {r['seconds']:.1f} | "
              f"{r['transfer']} |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mmseg_configs.demo OUT_DIR (--from-demo DEMO_DIR | karat=CKPT softmax=CKPT) [--quick]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m mmseg_configs.demo",
        description="make demo's segmentation stage on its own: convert classification checkpoints into UperNets, "
                    "fine-tune them with mmseg's runner on a generated ADE20K-layout set and evaluate (mIoU).")
    p.add_argument("out_dir", type=Path, help="output folder (new, or empty: an existing non-empty one is refused)")
    p.add_argument("checkpoints", nargs="*", metavar="NAME=CKPT",
                   help=f"backbones to transfer, NAME in {list(NAMES)}, e.g. "
                        f"karat=outputs/digits/classification/karat/checkpoint.pth")
    p.add_argument("--from-demo", type=Path, metavar="DEMO_DIR",
                   help="take both classifiers of a demo run: DEMO_DIR/classification/{karat,softmax}/checkpoint.pth "
                        "(python tools/demo.py --no-transfer --output-dir DEMO_DIR writes them)")
    p.add_argument("--quick", action="store_true", help="a few images and 2 iterations (a smoke test)")
    a = p.parse_args(argv)
    ckpts: Dict[str, Path] = {}
    if a.from_demo is not None:
        ckpts = {n: a.from_demo / "classification" / n / "checkpoint.pth" for n in NAMES}
    for item in a.checkpoints:
        name, sep, path = item.partition("=")
        if not sep or name not in NAMES or not path:
            p.error(f"{item!r} is not NAME=CKPT with NAME in {list(NAMES)}")
        ckpts[name] = Path(path)
    if not ckpts:
        p.error("give --from-demo DEMO_DIR or at least one NAME=CKPT")
    try:
        rows = run_stage(a.out_dir, ckpts, quick=a.quick)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(rows))
    print(f"results: {a.out_dir} (summary.md, <name>/transfer_report.txt, <name>/metrics.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
