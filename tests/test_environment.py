"""The environment the setup script builds has every framework the product plugs into, really importable."""
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[1]


def test_torch_and_torchvision_work_together():
    torch = require("torch")
    torchvision = require("torchvision")
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]


def test_detectron2_with_vitdet():
    require("detectron2")
    vit = require("detectron2.modeling.backbone.vit")
    assert hasattr(vit, "ViT") and hasattr(vit, "SimpleFeaturePyramid")
    lazy = require("detectron2.config")
    assert hasattr(lazy, "LazyConfig")


def test_openmmlab_stack_with_compiled_ops():
    mmcv = require("mmcv")
    assert mmcv.__version__.startswith("2.1")
    ext = require("mmcv._ext")  # mmseg and mmdet models import mmcv.ops, which needs the compiled ops
    assert ext is not None
    require("mmseg.models")
    require("mmdet.models")
    seg_models = require("mmseg.registry").MODELS
    det_models = require("mmdet.registry").MODELS
    assert seg_models.get("UPerHead") is not None and seg_models.get("VisionTransformer") is not None
    assert det_models.get("MaskRCNN") is not None


def test_fvcore_and_einops():
    require("fvcore.nn")
    require("einops")


def test_setup_is_idempotent_and_fast_on_a_ready_environment():
    venv = os.environ.get("VIRTUAL_ENV") or str(ROOT / ".venv")
    if not (Path(venv) / ".karat-env-stamp").exists():
        pytest.skip("not running inside the environment tools/setup_env.sh built")
    start = time.perf_counter()
    out = subprocess.run(["bash", str(ROOT / "tools" / "setup_env.sh")], env={**os.environ, "VENV": venv},
                         capture_output=True, text=True, check=True)
    assert "up to date" in out.stdout
    assert time.perf_counter() - start < 10
