"""The one transfer module: renaming tables per host, position-embedding fitting, and the state check's errors."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import karat  # noqa: F401  registers the KArAt models
from karat.transfer import (RENAMES, LoadReport, TransferReport, architecture, check_state, fit_pos_embed,
                            rename_state)

from conftest import require

TINY = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)  # 2 x 2 patches
KARAT = dict(grid=1, hidden_dim=2)


def timm_vit(karat_model: bool = True, **overrides) -> torch.nn.Module:
    name = "vit_tiny_patch16_224_karat" if karat_model else "vit_tiny_patch16_224"
    return timm.create_model(name, **{**TINY, **(KARAT if karat_model else {}), **overrides})


# ------------------------------------------------------------------------------------------------ renaming
@pytest.mark.parametrize("host", sorted(RENAMES))
def test_renaming_round_trips_for_every_host(host):
    state = timm_vit().state_dict()
    hosted, dropped = rename_state(state, host)
    assert "head.weight" in dropped and not any(k.startswith("head.") for k in hosted)
    back, none = rename_state(hosted, host, inverse=True)
    assert none == [] and set(back) == set(state) - set(dropped)
    assert all(back[k] is state[k] for k in back)  # the same tensors, only renamed


def test_mmseg_table_gives_exactly_mmseg_vit_names():
    require("mmseg")
    from mmseg.models.backbones import VisionTransformer

    state = timm_vit(karat_model=False).state_dict()
    hosted, _ = rename_state(state, "mmseg")
    mm = VisionTransformer(img_size=16, patch_size=8, embed_dims=16, num_layers=2, num_heads=2, mlp_ratio=4,
                           qkv_bias=True, patch_bias=True, final_norm=True)
    assert set(hosted) == set(mm.state_dict())
    assert all(hosted[k].shape == v.shape for k, v in mm.state_dict().items())


def test_detectron2_table_gives_exactly_vitdet_names():
    require("detectron2")
    from detectron2.modeling import ViT

    state = timm_vit(karat_model=False).state_dict()
    hosted, dropped = rename_state(state, "detectron2")
    vit = ViT(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, pretrain_img_size=16)
    expected = vit.state_dict()
    assert set(hosted) == set(expected) and {"cls_token", "norm.weight"} <= set(dropped)
    assert all(hosted[k].shape == v.shape for k, v in expected.items() if k != "pos_embed")  # d2 keeps the cls slot


def test_renaming_refuses_what_a_host_has_no_place_for():
    layer_scale = timm_vit(karat_model=False, init_values=1e-5).state_dict()
    for host in RENAMES:
        with pytest.raises(ValueError, match=rf"no counterpart in {host}'s ViT \(e\.g\. \['blocks\.0\.ls1\.gamma'"):
            rename_state(layer_scale, host)
    with pytest.raises(ValueError, match="No renaming table for host 'caffe'"):
        rename_state(layer_scale, "caffe")


# ------------------------------------------------------------------------------------------ position embedding
def test_fit_pos_embed_with_class_token_resamples_only_the_grid():
    pos = torch.randn(1, 1 + 16, 8)  # class slot + 4 x 4
    out, notes = fit_pos_embed(pos, (2, 3), cls_slot=True)
    torch.testing.assert_close(out, resample_abs_pos_embed(pos, new_size=[2, 3], num_prefix_tokens=1))
    assert out.shape == (1, 7, 8) and torch.equal(out[:, :1], pos[:, :1])
    assert notes == ["pos_embed resampled from 4x4 to 2x3 patches"]
    same, notes = fit_pos_embed(pos, (4, 4), cls_slot=True)
    assert torch.equal(same, pos) and notes == []
    no_cls, _ = fit_pos_embed(pos, (4, 4), cls_slot=False)  # a host without class token drops its slot
    assert torch.equal(no_cls, pos[:, 1:])


def test_fit_pos_embed_without_class_token():
    pos = torch.randn(1, 9, 8)  # 3 x 3, no class slot
    out, notes = fit_pos_embed(pos, (3, 3), cls_slot=True)
    assert out.shape == (1, 10, 8) and torch.equal(out[:, 0], torch.zeros(1, 8)) and torch.equal(out[:, 1:], pos)
    assert notes == ["pos_embed had no class-token slot; a zero one was added"]
    with pytest.raises(ValueError, match="has none: set pretrain_use_cls_token=False"):
        fit_pos_embed(pos, (3, 3), cls_slot=True, missing_cls="set pretrain_use_cls_token=False")
    out, _ = fit_pos_embed(pos, (6, 6), cls_slot=False, antialias=False, interpolation="bilinear")
    torch.testing.assert_close(out, resample_abs_pos_embed(pos, new_size=[6, 6], num_prefix_tokens=0,
                                                           interpolation="bilinear", antialias=False))
    with pytest.raises(ValueError, match="checkpoint: 7 tokens, neither a square.*Give the source grid"):
        fit_pos_embed(torch.randn(1, 7, 8), (3, 3), cls_slot=False)
    with pytest.raises(ValueError, match="fewer than its 3x3 patches"):
        fit_pos_embed(torch.randn(1, 8, 8), (3, 3), cls_slot=False, src_grid=(3, 3))


# ------------------------------------------------------------------------------------------------- the check
FIX = "Do this instead."


@pytest.mark.parametrize("other, message", [
    (dict(embed_dim=32), r"width \(embed_dim\) 32 vs the model's 16"),
    (dict(patch_size=4), r"patch size \(4, 4\) vs the model's \(8, 8\)"),
    (dict(depth=3), r"depth 3 vs the model's 2"),
    (dict(mlp_ratio=2.0), r"MLP width 32 vs the model's 64"),
])
def test_check_state_names_the_dimension_and_the_fix(other, message):
    model = timm_vit()
    with pytest.raises(ValueError, match=message + r".*Do this instead\.$"):
        check_state(model, timm_vit(**other).state_dict(), fix=FIX)


def test_check_state_names_the_token_count_and_what_is_missing_or_unknown():
    model = timm_vit()
    tokens = r"wrong shape .*attn\.karat\.operator.*differs.*: token count .*; KArAt operators' token count"
    with pytest.raises(ValueError, match=tokens):
        check_state(model, timm_vit(img_size=24).state_dict(), fix=FIX)  # 10 tokens, not resampled to 5
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"lacks 1 non-KArAt tensors .*'norm\.weight'.*Do this instead\.$"):
        check_state(model, {k: v for k, v in state.items() if k != "norm.weight"}, fix=FIX)
    with pytest.raises(ValueError, match=r"has 1 tensors that KArAtVisionTransformer does not have .*'extra'"):
        check_state(model, {**state, "extra": torch.zeros(1)})
    report = check_state(model, {**state, "extra": torch.zeros(1)}, drop=[r"^extra$"])
    assert report.dropped == ["extra"] and "extra" not in report.loaded


def test_check_state_reports_a_softmax_start_and_the_mmseg_names():
    model = timm_vit()
    report = check_state(model, timm_vit(karat_model=False).state_dict(), resampled=["pos_embed"])
    assert report.new and report.missing_non_karat == [] and report.resampled == ["pos_embed"]
    assert "pos_embed" not in report.loaded and len(report.loaded) + 1 == len(model.state_dict()) - len(report.new)
    assert "KArAt operator tensors only" in str(report) and LoadReport is TransferReport
    mm_state, _ = rename_state(timm_vit().state_dict(), "mmseg")
    assert architecture(mm_state, "mmseg") == {"width (embed_dims)": 16, "patch size": (8, 8),
                                               "depth (num_layers)": 2, "MLP width": 64}
