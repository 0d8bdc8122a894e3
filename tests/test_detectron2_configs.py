"""Every lazy config instantiates; KArAt configs and their softmax baselines differ only in the attention."""
import copy
from pathlib import Path

import pytest
import torch

from conftest import require

require("detectron2")
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.modeling.backbone import ViT  # noqa: E402
from detectron2.modeling.roi_heads import CascadeROIHeads  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from detectron2_plugin.backbone import KArAtViT  # noqa: E402
from karat import paper_param_count  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT / "configs" / "COCO"
# KArAt config -> (its softmax baseline, expected KArAt options)
PAIRS = {
    "mask_rcnn_vitdet_karat_t_100ep.py": ("mask_rcnn_vitdet_t_100ep.py", dict(grid=3, blockwise=True)),
    "mask_rcnn_vitdet_karat_s_100ep.py": ("mask_rcnn_vitdet_s_100ep.py", dict(grid=3, blockwise=True)),
    "mask_rcnn_vitdet_karat_b_blockwise_100ep.py": ("mask_rcnn_vitdet_b_100ep.py", dict(grid=1, blockwise=True)),
    "mask_rcnn_vitdet_karat_b_universal_100ep.py": ("mask_rcnn_vitdet_b_100ep.py", dict(grid=1, universal=True)),
    "cascade_mask_rcnn_vitdet_karat_b_100ep.py": ("cascade_mask_rcnn_vitdet_b_100ep.py", dict(grid=1, blockwise=True)),
}
SHAPES = {"mask_rcnn_vitdet_karat_t_shapes.py": "mask_rcnn_vitdet_t_shapes.py"}
ALL = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.py") if p.parent.name != "common")
# Keep instantiation quick: 3 blocks (2 windowed, 1 global) instead of 12; everything else as configured.
SHRINK = ["model.backbone.net.depth=3", "model.backbone.net.window_block_indexes=[0,1]"]


def _load(path, overrides=()):
    return LazyConfig.apply_overrides(LazyConfig.load(str(ROOT / path)), list(overrides))


def test_there_is_a_config_for_every_size_and_setting():
    names = {Path(p).name for p in ALL}
    assert set(PAIRS) | {b for b, _ in PAIRS.values()} | set(SHAPES) | set(SHAPES.values()) <= names


@pytest.mark.parametrize("path", ALL)
def test_config_instantiates(path):
    cfg = _load(path, SHRINK)
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg)
    model = instantiate(cfg.model)
    net = model.backbone.net
    is_karat = "karat" in Path(path).name
    assert type(net) is (KArAtViT if is_karat else ViT)
    assert isinstance(model.roi_heads, CascadeROIHeads) == Path(path).name.startswith("cascade")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    lrs = {g["lr"] for g in optimizer.param_groups}
    assert len(lrs) > 3  # layer-wise lr decay (detectron2's get_vit_lr_decay_rate)


@pytest.mark.parametrize("karat_cfg", sorted(PAIRS))
def test_softmax_baseline_is_the_same_config_with_karat_off(karat_cfg):
    softmax_cfg, options = PAIRS[karat_cfg]
    k = OmegaConf.to_container(_load(f"configs/COCO/{karat_cfg}"), resolve=False)
    s = OmegaConf.to_container(_load(f"configs/COCO/{softmax_cfg}"), resolve=False)
    karat = k["model"]["backbone"]["net"].pop("karat")
    assert k["model"]["backbone"]["net"].pop("_target_") is KArAtViT
    assert s["model"]["backbone"]["net"].pop("_target_") is ViT
    for part in ("model", "dataloader", "train"):
        assert _plain(k[part]) == _plain(s[part]), part
    assert {key: karat[key] for key in options} == options


def _plain(tree):
    """Configs compared as text (partials and classes by their repr)."""
    return repr(copy.deepcopy(tree))


def test_coco_recipe():
    cfg = _load("configs/COCO/mask_rcnn_vitdet_karat_b_blockwise_100ep.py")
    net = cfg.model.backbone.net
    assert (net.img_size, net.patch_size, net.window_size, net.embed_dim) == (1024, 16, 14, 768)
    assert list(net.window_block_indexes) == [0, 1, 3, 4, 6, 7, 9, 10] and net.use_rel_pos
    assert net.drop_path_rate == 0.1 and cfg.model.backbone.square_pad == 1024
    assert cfg.train.max_iter == 184375 and cfg.dataloader.train.total_batch_size == 64
    assert cfg.optimizer._target_ is torch.optim.AdamW
    assert cfg.optimizer.params.lr_factor_func.keywords == dict(num_layers=12, lr_decay_rate=0.7)
    augs = [a._target_.__name__ for a in cfg.dataloader.train.mapper.augmentations]
    assert augs == ["RandomFlip", "ResizeScale", "FixedSizeCrop"]  # large-scale jitter at 1024 px


@pytest.mark.slow
def test_full_size_base_operators_have_the_papers_token_counts():
    """ViT-B, G = 1, r = 12: (2G + 3) * N * r parameters per head as the paper counts them (its unused zero-base
    weight included, karat.paper_param_count), N = 196 in windows and 4096 in global blocks; without that weight
    the model holds (2G + 2) * N * r."""
    nets = {name: instantiate(_load(f"configs/COCO/{name}").model.backbone.net)
            for name in ("mask_rcnn_vitdet_b_100ep.py", "mask_rcnn_vitdet_karat_b_blockwise_100ep.py",
                         "mask_rcnn_vitdet_karat_b_universal_100ep.py")}
    for count, per_token in ((paper_param_count, 12 * 5 * 12),  # heads * (2G + 3) * r
                             (lambda net: sum(p.numel() for p in net.parameters()), 12 * 4 * 12)):
        counts = {name: count(net) for name, net in nets.items()}
        base = counts["mask_rcnn_vitdet_b_100ep.py"]
        assert counts["mask_rcnn_vitdet_karat_b_blockwise_100ep.py"] - base == per_token * (8 * 196 + 4 * 4096)
        assert counts["mask_rcnn_vitdet_karat_b_universal_100ep.py"] - base == per_token * (196 + 4096)


def test_shapes_config_runs_inference():
    cfg = _load("configs/shapes/mask_rcnn_vitdet_karat_t_shapes.py", SHRINK)
    model = instantiate(cfg.model).eval()
    assert model.backbone.net.block_layouts() == {0: (4, 4), 1: (4, 4), 2: (16, 16)}  # the classifier's 16 tokens
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)}])
    assert out[0]["instances"].has("pred_masks")
    assert list(model.backbone.output_shape()) == ["p1", "p2", "p3"]
