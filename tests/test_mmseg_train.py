"""mmseg's own tools/train.py and tools/test.py on the embedded ADE20K-layout set, with --cfg-options only:
a few iterations, a validation pass (IoUMetric), a checkpoint, resuming from it, testing it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "mmseg_configs" / "upernet" / "upernet_vit-t2-karat_1xb8-60iter_embedded-16x16.py"


def _tool(name: str) -> Path:
    mmseg = require("mmseg")
    path = Path(mmseg.__file__).parent / ".mim" / "tools" / name
    assert path.is_file(), f"mmseg's {name} is not shipped in the installed package"
    return path


def _run(args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")  # tiny models: one thread is faster
    return subprocess.run([sys.executable, "-W", "ignore", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _options(data_root: Path, max_iters: int):
    return ["--cfg-options", f"train_dataloader.dataset.data_root={data_root}",
            f"val_dataloader.dataset.data_root={data_root}", f"test_dataloader.dataset.data_root={data_root}",
            f"train_cfg.max_iters={max_iters}", "train_cfg.val_interval=2", "default_hooks.checkpoint.interval=2",
            "default_hooks.checkpoint.max_keep_ckpts=3", "default_hooks.logger.interval=1",
            "train_dataloader.batch_size=4", "model.backbone.num_layers=4", "model.backbone.embed_dims=48",
            "model.backbone.out_indices=[0,1,2,3]", "model.neck.in_channels=[48,48,48,48]",
            "model.backbone.hidden_dim=4", "model.backbone.grid=2"]


@pytest.mark.slow
def test_train_resume_and_test_with_mmseg_tools(tmp_path):
    from mmseg_configs.data import make_embedded_ade20k

    train, test = _tool("train.py"), _tool("test.py")
    data_root = make_embedded_ade20k(tmp_path / "data", num_train=8, num_val=4)
    work = tmp_path / "work"
    r = _run([train, CONFIG, "--work-dir", work, *_options(data_root, 2)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert re.search(r"Iter\(val\).*aAcc: [\d.]+\s+mIoU: [\d.]+", log), log[-2000:]
    assert (work / "iter_2.pth").is_file()

    r = _run([train, CONFIG, "--work-dir", work, "--resume", *_options(data_root, 4)], cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "resumed" in log.lower() and "iter_2.pth" in log, log[-2000:]
    assert "Iter(train) [1/4]" not in log and "Iter(train) [3/4]" in log  # continued, not restarted
    assert (work / "iter_4.pth").is_file()

    r = _run([test, CONFIG, work / "iter_4.pth", "--work-dir", tmp_path / "test", *_options(data_root, 4)],
             cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert re.search(r"Iter\(test\).*mIoU: [\d.]+", log), log[-2000:]


def test_wrong_dataset_layout_is_a_clear_error(tmp_path):
    require("mmseg")
    from mmseg_configs.data import check_ade20k_layout, make_embedded_ade20k

    with pytest.raises(ValueError, match="does not exist"):
        check_ade20k_layout(tmp_path / "nowhere")
    root = make_embedded_ade20k(tmp_path / "d", num_train=2, num_val=1)
    for png in (root / "annotations" / "validation").glob("*.png"):
        png.unlink()
    with pytest.raises(ValueError, match="have no label .png"):
        check_ade20k_layout(root)
    (root / "annotations" / "training").rename(root / "labels")
    from mmengine.registry import DefaultScope
    from mmseg.registry import DATASETS

    # mmseg's scope explicitly: a runner built earlier in this process (mmdet's) may have left its own as default
    with DefaultScope.overwrite_default_scope("mmseg"), pytest.raises(ValueError, match="annotations/training"):
        DATASETS.build(dict(type="CheckedADE20KDataset", data_root=str(root),
                            data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
                            pipeline=[]))


def test_embedded_data_is_deterministic_and_read_by_ade20k(tmp_path):
    require("mmseg")
    import numpy as np
    from PIL import Image

    from mmseg.datasets import ADE20KDataset
    from mmseg_configs.data import make_embedded_ade20k

    a = make_embedded_ade20k(tmp_path / "a", num_train=3, num_val=2)
    b = make_embedded_ade20k(tmp_path / "b", num_train=3, num_val=2)
    for rel in ("images/training/ADE_train_00000002.jpg", "annotations/validation/ADE_val_00000001.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    label = np.array(Image.open(a / "annotations/training/ADE_train_00000000.png"))
    assert label[0].max() == 0 and label.max() > 1  # ignored frame, classes inside
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets.transforms import LoadAnnotations

    prefix = dict(img_path="images/training", seg_map_path="annotations/training")
    ds = ADE20KDataset(data_root=str(a), data_prefix=prefix,
                       pipeline=[LoadImageFromFile(), LoadAnnotations(reduce_zero_label=True)])
    assert len(ds) == 3 and ds.reduce_zero_label
    sample = ds[0]
    assert sample["img"].shape == (16, 16, 3) and sample["gt_seg_map"][0, 0] == 255  # 0 -> ignore (255)
    with pytest.raises(FileExistsError):
        make_embedded_ade20k(tmp_path / "a", num_train=5, num_val=2)


@pytest.mark.slow
def test_test_tool_whole_inference_on_images_of_several_sizes(tmp_path):
    """mmseg's tools/test.py, mode='whole', on validation images of different, non-square sizes, larger than the
    model's 16 x 16 img_size in either direction: every one evaluated whole at its own size."""
    import argparse

    import numpy as np
    import torch
    from mmengine.config import Config, DictAction
    from mmengine.registry import DefaultScope
    from PIL import Image

    import mmseg_configs  # noqa: F401  registers the backbones
    from mmseg.registry import MODELS
    from mmseg_configs.data import make_embedded_ade20k

    test = _tool("test.py")
    sizes = [(20, 28), (24, 16), (12, 36)]
    data_root = make_embedded_ade20k(tmp_path / "data", num_train=1, num_val=3, val_sizes=sizes)
    options = _options(data_root, 1) + ["test_dataloader.batch_size=1"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict(parser.parse_args(options).cfg_options)
    assert cfg.model.test_cfg.mode == "whole"
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(cfg.model)
    torch.save({"state_dict": model.state_dict(), "meta": {}}, tmp_path / "model.pth")
    out = tmp_path / "pred"
    r = _run([test, CONFIG, tmp_path / "model.pth", "--work-dir", tmp_path / "test", "--out", out, *options],
             cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert re.search(r"Iter\(test\).*mIoU: [\d.]+", log), log[-2000:]
    preds = sorted(out.glob("*.png"))
    assert [np.array(Image.open(p)).shape for p in preds] == sizes
