#!/usr/bin/env python
"""Train or evaluate a detectron2 lazy config (the project's ViTDet-KArAt configs, or any other) with detectron2's
trainer, hooks, checkpointer, evaluator and launcher, for users who installed detectron2 without its source tree.

It takes detectron2's standard arguments::

    python tools/lazyconfig_train.py --config-file configs/COCO/mask_rcnn_vitdet_karat_b_blockwise_100ep.py \
        --num-gpus 8 train.init_checkpoint=ckpt/vitdet_karat_b.pth
    python tools/lazyconfig_train.py --config-file ... --num-machines 2 --machine-rank 0 --dist-url tcp://host:port
    python tools/lazyconfig_train.py --config-file ... --eval-only train.init_checkpoint=output/model_final.pth
    python tools/lazyconfig_train.py --config-file ... --resume
    python tools/lazyconfig_train.py --config-file ... --allow-pickle train.init_checkpoint=model_zoo_R50.pkl

Checkpoints load weights only (tensors and plain values); detectron2's pickled ``.pkl``/``.pyth`` files run code
when read, so they load only with ``--allow-pickle``, for files from a source you trust.

The loop itself is detectron2_plugin.train_net (detectron2's trainer, hooks, checkpointer and evaluator); besides
what detectron2's ``tools/lazyconfig_train_net.py`` does, it checks the config first, refuses ``--eval-only``
without a checkpoint, and writes the final metrics to ``<output_dir>/final_metrics.json`` (``eval_metrics.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from detectron2.engine import default_argument_parser, launch

from detectron2_plugin.train_net import main
from tools.config_paths import check_config_path

ROOT = Path(__file__).resolve().parents[1]


def check_launch(num_gpus: int, num_machines: int) -> None:
    """Refuse a multi-process launch that cannot work here, before detectron2's launcher spawns anything:
    detectron2 runs one process per CUDA GPU (NCCL), so --num-gpus N needs N visible GPUs."""
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpus < 0 or num_machines < 1:
        raise ValueError(f"--num-gpus {num_gpus} / --num-machines {num_machines}: need --num-gpus >= 0 and "
                         f"--num-machines >= 1.")
    if (num_gpus > 1 or num_machines > 1) and available < max(num_gpus, 1):
        fix = ("On a CPU-only machine run one process: --num-gpus 1 (the default) with train.device=cpu."
               if available == 0 else f"Use --num-gpus {available} (and scale the batch size and lr with it).")
        raise ValueError(f"--num-gpus {num_gpus}{f' --num-machines {num_machines}' if num_machines > 1 else ''} "
                         f"starts {num_gpus} processes per machine, one per CUDA GPU, but this machine has "
                         f"{available} CUDA GPU(s). {fix}")


def argument_parser():
    """detectron2's standard arguments plus ``--allow-pickle``."""
    parser = default_argument_parser()
    parser.add_argument("--allow-pickle", action="store_true",
                        help="let pickled .pkl/.pyth checkpoints load (they can run code: trusted files only)")
    return parser


def invoke_main(argv: Optional[list] = None) -> None:
    parser = argument_parser()
    args = parser.parse_args(argv)
    try:
        check_config_path(args.config_file, [ROOT / "configs"])
        check_launch(args.num_gpus, args.num_machines)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
