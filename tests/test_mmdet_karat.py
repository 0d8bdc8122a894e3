"""mmdet: the KArAt ViT Mask R-CNN config builds and trains a few iterations through mmdet's runner on a tiny
COCO-format set generated here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import require

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "mmseg_configs" / "mmdet" / "mask-rcnn_vit-b16-karat_sfp_8xb2-1x_coco-1024x1024.py"


def make_coco(root: Path, n: int = 4, size: int = 64) -> Path:
    """Images with one or two filled rectangles each, annotated as COCO instances (polygon masks)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        img = np.full((size, size, 3), 30, np.uint8)
        for _ in range(1 + i % 2):
            x0, y0 = (int(v) for v in rng.integers(2, size // 2, 2))
            w, h = (int(v) for v in rng.integers(12, size // 2, 2))
            cat = 1 + int(rng.integers(2))
            img[y0:y0 + h, x0:x0 + w] = (200, 60, 60) if cat == 1 else (60, 200, 60)
            poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=cat, bbox=[x0, y0, w, h],
                                    area=w * h, iscrowd=0, segmentation=[poly]))
        Image.fromarray(img).save(root / "images" / f"{i:04d}.jpg")
        images.append(dict(id=i + 1, file_name=f"{i:04d}.jpg", width=size, height=size))
    ann = root / "instances.json"
    ann.write_text(json.dumps(dict(images=images, annotations=annotations,
                                   categories=[dict(id=1, name="person"), dict(id=2, name="bicycle")])))
    return ann


@pytest.mark.slow
def test_mask_rcnn_karat_vit_trains_with_mmdet_runner(tmp_path, request):
    require("mmdet")
    require("pycocotools")
    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner

    ann = make_coco(tmp_path / "coco")
    from mmengine.registry import DefaultScope

    cfg = Config.fromfile(str(CONFIG))
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):  # mmdet's, whichever scope is current
        full = MODELS.build(cfg.model)  # the full-size config builds (ViT-B, 4096 tokens)
    assert type(full.backbone).__name__ == "KArAtVisionTransformer" and full.backbone.num_tokens == 4096
    assert type(full.neck).__name__ == "SimpleFeaturePyramid"
    del full

    cfg.merge_from_dict({
        "model.backbone.img_size": (64, 64), "model.backbone.embed_dims": 48, "model.backbone.num_layers": 2,
        "model.backbone.num_heads": 3, "model.backbone.out_indices": (1,), "model.backbone.hidden_dim": 4,
        "model.backbone.drop_path_rate": 0.0, "model.neck.in_channels": 48,
        "train_dataloader.batch_size": 2, "train_dataloader.num_workers": 0,
        "train_dataloader.persistent_workers": False,
        "train_dataloader.dataset.data_root": str(tmp_path / "coco"),
        "train_dataloader.dataset.ann_file": str(ann),
        "train_dataloader.dataset.data_prefix": dict(img=str(tmp_path / "coco" / "images") + "/"),
        "train_dataloader.dataset.pipeline.2.scale": (64, 64),
        "train_cfg.max_epochs": 2, "train_cfg.val_interval": 10,
        "default_hooks.logger.interval": 1, "param_scheduler": [],
    })
    cfg.val_dataloader = cfg.test_dataloader = cfg.val_evaluator = cfg.test_evaluator = None
    cfg.val_cfg = cfg.test_cfg = None
    cfg.work_dir = str(tmp_path / "work")
    cfg.visualizer.name = "mmdet_karat_test_visualizer"
    runner = Runner.from_cfg(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model, many small ops
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    before = runner.model.backbone.layers[0].attn.karat.operator.weight.detach().clone()
    runner.train()
    assert runner.iter == 4  # 4 images, batch 2, 2 epochs
    after = runner.model.backbone.layers[0].attn.karat.operator.weight
    assert not torch.equal(before, after)  # KArAt weights trained
    assert (tmp_path / "work" / "epoch_2.pth").is_file()
    loss = runner.message_hub.get_scalar("train/loss").current()
    assert np.isfinite(loss)
