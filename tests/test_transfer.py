"""karat.transfer: reading classifiers for the host converters, and checking what a conversion produced."""
from __future__ import annotations


import pytest
import timm
import torch
import torch.nn as nn

import karat  # noqa: F401
from karat import KArAtConfig, KArAtOperator, TokenLayout, resample_karat_state_dict, save_checkpoint
from karat.transfer import check_transfer, load_vit_source

SMALL = dict(img_size=64, depth=2)  # 4 x 4 patches of 16 px (+ class token)


def _written_by_main(tmp_path, name="vit_tiny_patch16_224_karat", **extra):
    kwargs = dict(SMALL, num_classes=10, grid=2, hidden_dim=4, grid_range=[-1.0, 1.0], **extra)
    model = timm.create_model(name, **kwargs)
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(dict(model=model.state_dict(), model_name=name, model_kwargs=kwargs, epoch=3), path)
    return model, path


def test_classification_checkpoint_reads_with_its_architecture_and_options(tmp_path):
    model, path = _written_by_main(tmp_path, universal=True)
    src = load_vit_source(str(path))
    assert (src.embed_dim, src.depth, src.num_heads, src.patch_size, src.in_chans) == (192, 2, 3, 16, 3)
    assert src.layout == TokenLayout(1, (4, 4)) and src.is_karat
    assert src.karat_config() == model.karat_cfg
    assert src.karat_config(impl="reference").impl == "reference"
    assert src.dropped == ["head.weight", "head.bias"] and "head.weight" not in src.state_dict
    assert torch.equal(src.state_dict["blocks.1.attn.karat.operator.weight"],
                       model.state_dict()["blocks.1.attn.karat.operator.weight"])


def test_softmax_state_dict_files_infer_layout_and_heads(tmp_path):
    from safetensors.torch import save_file

    model = timm.create_model("vit_small_patch16_224", **SMALL, class_token=False, global_pool="avg")
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}  # a DDP-wrapped save
    torch.save(sd, tmp_path / "vit.pth")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    for name in ("vit.pth", "vit.safetensors"):
        src = load_vit_source(str(tmp_path / name))
        assert (src.num_heads, src.layout, src.is_karat) == (6, TokenLayout(0, (4, 4)), False)
        assert "blocks.0.attn.qkv.weight" in src.state_dict
    assert load_vit_source(str(tmp_path / "vit.pth"), num_heads=4).num_heads == 4


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vit_source(str(tmp_path / "missing.pth"))
    torch.save(timm.create_model("resnet18", num_classes=2).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a ViT classifier checkpoint"):
        load_vit_source(str(tmp_path / "resnet.pth"))
    model, path = _written_by_main(tmp_path)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="not the options they were trained with"):
        load_vit_source(str(tmp_path / "bare.pth"))
    with pytest.raises(ValueError, match="timm has no model"):
        load_vit_source("timm:vit_nonexistent_patch16")


class _TwoSizes(nn.Module):
    """A host with blocks seeing different token counts (ViTDet: windows and global blocks)."""

    def __init__(self, cfg: KArAtConfig) -> None:
        super().__init__()
        self.window = KArAtOperator(2, 4, cfg)
        self.glob = KArAtOperator(2, 64, cfg)


def test_resample_to_per_operator_layouts():
    cfg = KArAtConfig(grid=2, hidden_dim=4)
    src_model = _TwoSizes(cfg)
    src_model.window, src_model.glob = KArAtOperator(2, 17, cfg), KArAtOperator(2, 17, cfg)
    target = _TwoSizes(cfg)
    layouts = {"window": TokenLayout(0, (2, 2)), "glob": TokenLayout(0, (8, 8))}
    sd, report = resample_karat_state_dict(src_model.state_dict(), target, lambda name, op: layouts[name],
                                           src_prefix=1)
    target.load_state_dict(sd)  # every shape now fits
    assert len(report.moves) == 2 and "to 4 tokens" in str(report) and "to 64 tokens" in str(report)
    with pytest.raises(ValueError, match="does not match its operator"):
        resample_karat_state_dict(src_model.state_dict(), target, lambda name, op: TokenLayout(0, (3, 3)))


def test_check_transfer_reports_and_refuses_mismatches():
    target = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    report = check_transfer({"0.weight": torch.zeros(4, 4), "0.bias": torch.zeros(4)}, target,
                            resampled=["0.weight"], dropped=["head.weight"])
    assert (report.loaded, report.resampled, report.new) == (["0.bias"], ["0.weight"], ["1.weight", "1.bias"])
    assert "newly initialised:   2 tensors" in str(report)
    with pytest.raises(ValueError, match="another architecture"):
        check_transfer({"2.weight": torch.zeros(1)}, target)
    with pytest.raises(ValueError, match="wrong shape"):
        check_transfer({"0.weight": torch.zeros(3, 4)}, target)


def test_adapt_patch_embed_grey_to_rgb_and_clear_refusal():
    from karat.transfer import adapt_patch_embed

    grey = torch.randn(8, 1, 2, 2)
    rgb, how = adapt_patch_embed(grey, 3)
    img = torch.randn(1, 1, 4, 4)
    # a grey image repeated on three channels embeds exactly as the grey image did
    torch.testing.assert_close(torch.nn.functional.conv2d(img.repeat(1, 3, 1, 1), rgb, stride=2),
                               torch.nn.functional.conv2d(img, grey, stride=2))
    assert "grayscale" in how and adapt_patch_embed(rgb, 3)[0] is rgb
    with pytest.raises(ValueError, match="Cannot adapt a patch embedding for 2 input channels to 3"):
        adapt_patch_embed(torch.randn(8, 2, 2, 2), 3)
