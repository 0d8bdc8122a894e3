"""Checkpoints written while the zero base still stored its unused ``w_b`` (``...phi.base_weight``) keep loading:
into every timm family, through the fine-tuning filter, through both converters, and as converted backbones."""
from __future__ import annotations

from typing import Dict

import pytest
import timm
import torch

import karat
from conftest import require
from karat import is_karat_key, load_checkpoint, save_checkpoint

SMALL = {
    "vit_tiny_patch16_224_karat": dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3),
    "swin_tiny_patch4_window7_224_karat": dict(img_size=32, patch_size=4, window_size=4, embed_dim=12, depths=(2,),
                                               num_heads=(2,)),
    "convit_tiny_karat": dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, local_up_to_layer=1),
}


def with_old_base_weights(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` as the zero base used to write it: a ``base_weight`` beside each KArAt ``basis_scale`` (same shape)."""
    old = {k[: -len("basis_scale")] + "base_weight": torch.randn_like(v) for k, v in state.items()
           if k.endswith(".basis_scale") and is_karat_key(k)}
    assert old, "no KArAt layer found"
    return {**state, **old}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_old_checkpoints_load_strictly_into_every_family(name):
    model = timm.create_model(name, num_classes=5, grid=2, hidden_dim=4, **SMALL[name])
    assert not [n for n, _ in model.named_parameters() if n.endswith("base_weight")]
    fresh = timm.create_model(name, num_classes=5, grid=2, hidden_dim=4, **SMALL[name])
    result = fresh.load_state_dict(with_old_base_weights(model.state_dict()), strict=True)
    assert not result.unexpected_keys and not result.missing_keys
    torch.testing.assert_close(fresh.state_dict(), model.state_dict())


def test_fine_tuning_filter_takes_old_checkpoints():
    from karat.models.vision_transformer import karat_vit_filter_fn

    kw = dict(SMALL["vit_tiny_patch16_224_karat"], num_classes=5)
    src = timm.create_model("vit_tiny_patch16_224_karat", **kw)
    dst = timm.create_model("vit_tiny_patch16_224_karat", **dict(kw, img_size=48))  # resampled: 17 -> 37 tokens
    out = karat_vit_filter_fn(with_old_base_weights(src.state_dict()), dst)
    assert not [k for k in out if k.endswith("base_weight")]
    dst.load_state_dict(out, strict=True)


def test_paper_param_count_adds_only_the_zero_bases_w_b():
    kw = dict(SMALL["vit_tiny_patch16_224_karat"], num_classes=5)
    zero = timm.create_model("vit_tiny_patch16_224_karat", **kw)
    silu = timm.create_model("vit_tiny_patch16_224_karat", base_fn="nn.SiLU", **kw)
    n_zero, n_silu = (sum(p.numel() for p in m.parameters()) for m in (zero, silu))
    assert karat.paper_param_count(silu) == n_silu  # a real base stores w_b: nothing to add
    assert karat.paper_param_count(zero) == n_silu  # the paper's count of the zero base is the same architecture's
    assert n_silu - n_zero == 2 * 3 * 17 * 12  # two blocks x (3 heads x 17 keys x r = 12) unused w_b


def save_old_classifier(kwargs: dict, path) -> None:
    """A classification checkpoint as written before the zero base stopped storing ``w_b``."""
    model = timm.create_model("vit_tiny_patch16_224_karat", **kwargs)
    save_checkpoint(dict(model=with_old_base_weights(model.state_dict()), model_name="vit_tiny_patch16_224_karat",
                         model_kwargs=kwargs), path)


def test_detectron2_converter_and_loader_take_old_checkpoints(tmp_path):
    require("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate

    from detectron2_plugin.convert import convert_file
    from test_detectron2_convert import CLS, KARAT, KARAT_CFG, KARAT_NET

    kwargs = dict(CLS, **KARAT)
    save_old_classifier(kwargs, tmp_path / "old_cls.pth")
    conv = convert_file(str(tmp_path / "old_cls.pth"), KARAT_CFG, tmp_path / "vitdet.pth", KARAT_NET)
    assert sum(k.endswith("base_weight") for k in conv.report.dropped) == 2  # one per block, reported as dropped
    assert not [k for k in conv.state_dict if k.endswith("base_weight")]

    # a backbone checkpoint converted before the change (it holds w_b) loads through detectron2's checkpointer
    ckpt = load_checkpoint(tmp_path / "vitdet.pth")
    ckpt["model"] = with_old_base_weights(ckpt["model"])
    save_checkpoint(ckpt, tmp_path / "old_vitdet.pth")
    det = instantiate(LazyConfig.apply_overrides(LazyConfig.load(KARAT_CFG), KARAT_NET).model)
    checkpointer = DetectionCheckpointer(det)
    seen = []
    checkpointer._log_incompatible_keys = seen.append
    checkpointer.load(str(tmp_path / "old_vitdet.pth"))
    assert seen[0].unexpected_keys == [] and seen[0].incorrect_shapes == []
    torch.testing.assert_close(det.backbone.net.blocks[0].attn.karat.operator.weight,
                               ckpt["model"]["backbone.net.blocks.0.attn.karat.operator.weight"])


def test_mmseg_converter_and_loaders_take_old_checkpoints(tmp_path):
    require("mmseg")
    from mmengine.runner.checkpoint import _load_checkpoint_to_model

    import mmseg_configs.backbones as backbones
    from mmseg_configs.export import convert_classifier
    from test_mmseg_transfer import DIGITS, KARAT

    kwargs = dict(DIGITS, **KARAT)
    save_old_classifier(kwargs, tmp_path / "old_cls.pth")
    out = tmp_path / "mmseg.pth"
    report = convert_classifier(str(tmp_path / "old_cls.pth"), out, img_size=(16, 16))
    assert sum(k.endswith("base_weight") for k in report.dropped) == 2

    ckpt = load_checkpoint(out)
    ckpt["state_dict"] = with_old_base_weights(ckpt["state_dict"])  # converted before the change
    old = tmp_path / "old_mmseg.pth"
    save_checkpoint(ckpt, old)
    meta = ckpt["meta"]["backbone"]
    opts = {k: v for k, v in meta.items() if k not in ("type", "karat_cfg")}
    net = backbones.KArAtVisionTransformer(**opts, karat_cfg=meta["karat_cfg"],
                                           init_cfg=dict(type="Pretrained", checkpoint=str(old)))
    net.init_weights()  # init_cfg=Pretrained
    assert net.load_report.new == [] and sum(k.endswith("base_weight") for k in net.load_report.dropped) == 2
    seg = torch.nn.Module()
    seg.backbone = backbones.KArAtVisionTransformer(**opts, karat_cfg=meta["karat_cfg"])
    _load_checkpoint_to_model(seg, load_checkpoint(old), strict=True)  # load_from
    torch.testing.assert_close(seg.backbone.layers[1].attn.karat.operator.weight,
                               net.layers[1].attn.karat.operator.weight)
