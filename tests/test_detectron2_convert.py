"""Classification checkpoint -> ViTDet backbone checkpoint: loads with no surprise keys, resampled KArAt blocks keep
their function, bad inputs fail clearly."""
from pathlib import Path

import pytest
import timm
import torch

from conftest import require

require("detectron2")
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402

import karat  # noqa: E402,F401
from detectron2_plugin.convert import convert_file  # noqa: E402
from karat import TokenLayout, save_checkpoint  # noqa: E402
from test_resample import _smooth, _smooth_operator  # noqa: E402  (the core's smooth-operator helper)

ROOT = Path(__file__).resolve().parents[1]
KARAT_CFG = str(ROOT / "configs/shapes/mask_rcnn_vitdet_karat_t_shapes.py")
SOFTMAX_CFG = str(ROOT / "configs/shapes/mask_rcnn_vitdet_t_shapes.py")
# A small classifier: 16 px, patch 2 (8 x 8 tokens), no class token, grayscale, like the demo's (smaller).
CLS = dict(img_size=16, patch_size=2, in_chans=1, num_classes=10, class_token=False, global_pool="avg", embed_dim=32,
           depth=2, num_heads=2)
KARAT = dict(basis_type="FourierBasis", grid=2, hidden_dim=4, modular_attn=True, modular_mode="phi1_w2", blockwise=True)
# The target: 32 px (16 x 16 tokens), block 0 windowed with 8 x 8 windows (the classifier's 64 tokens), block 1 global.
NET = ["model.backbone.net.embed_dim=32", "model.backbone.net.depth=2", "model.backbone.net.num_heads=2",
       "model.backbone.net.window_size=8", "model.backbone.net.window_block_indexes=[0]",
       "model.backbone.net.pretrain_img_size=16"]
KARAT_NET = NET + ["model.backbone.net.karat.grid=2", "model.backbone.net.karat.hidden_dim=4"]


def _classifier(path: Path, karat_on: bool = True, smooth: bool = False, **over) -> torch.nn.Module:
    name = "vit_tiny_patch16_224_karat" if karat_on else "vit_tiny_patch16_224"
    kwargs = dict(CLS, **(KARAT if karat_on else {}), **over)
    model = timm.create_model(name, **kwargs)
    if smooth:
        for blk in model.blocks:
            _smooth_operator(blk.attn.karat, TokenLayout(0, (8, 8)))
    save_checkpoint(dict(model=model.state_dict(), model_name=name, model_kwargs=kwargs), path)
    return model


def _load(config: str, overrides, ckpt: Path):
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config), overrides)
    model = instantiate(cfg.model)
    checkpointer = DetectionCheckpointer(model)
    seen = []
    checkpointer._log_incompatible_keys = seen.append  # what DetectionCheckpointer reports as incompatible
    checkpointer.load(str(ckpt))
    return model, seen[0]


def test_karat_checkpoint_loads_with_no_surprises_and_keeps_its_function(tmp_path):
    src = _classifier(tmp_path / "cls.pth", smooth=True).double().eval()
    out = tmp_path / "vitdet.pth"
    conv = convert_file(str(tmp_path / "cls.pth"), KARAT_CFG, out, KARAT_NET)
    model, incompatible = _load(KARAT_CFG, KARAT_NET, out)
    net_missing = sorted(k for k in incompatible.missing_keys if k.startswith("backbone.net."))
    assert net_missing == sorted(conv.report.new)  # only what the report calls new: the rel-pos tables
    assert all(".rel_pos_" in k for k in net_missing) and len(net_missing) == 4
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    resampled = [k for k in conv.report.resampled if ".karat." in k]
    assert resampled and all(k.startswith("backbone.net.blocks.1.") for k in resampled)  # only the global block
    assert "backbone.net.patch_embed.proj.weight" in conv.report.resampled  # grayscale -> RGB
    state = model.state_dict()
    torch.testing.assert_close(state["backbone.net.blocks.0.attn.karat.operator.weight"],
                               src.blocks[0].attn.karat.operator.weight.float())  # window = 64 tokens: as trained

    # The same smooth content seen by the classifier's block (8 x 8) and by the converted global block (16 x 16):
    # the outputs, pooled back to 8 x 8, agree within 5 % (relative L2), the core's resampling tolerance.
    gen = torch.Generator().manual_seed(3)
    amps = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    freqs = [(0, 0), (1, 0), (0, 1), (1, 1)]
    coarse = _smooth((8, 8), freqs, amps).T.reshape(1, 64, 32)
    fine = _smooth((16, 16), freqs, amps).T.reshape(1, 16, 16, 32)
    dst = model.backbone.net.blocks[1].attn.double().eval()
    with torch.no_grad():
        before = src.blocks[1].attn(coarse).reshape(1, 8, 8, 32)
        after = dst(fine)
    pooled = torch.nn.functional.avg_pool2d(after.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    rel = float((pooled - before).norm() / before.norm())
    print(f"resampled global block: relative L2 change {rel:.4f}")
    assert rel < 0.05, f"relative change of the resampled global block's output: {rel:.3f}"


def test_softmax_timm_vit_with_class_token(tmp_path):
    _classifier(tmp_path / "cls.pth", karat_on=False, class_token=True, global_pool="token", in_chans=3)
    overrides = NET + ["model.backbone.net.pretrain_use_cls_token=True"]
    conv = convert_file(str(tmp_path / "cls.pth"), SOFTMAX_CFG, tmp_path / "out.pth", overrides)
    assert "cls_token" in conv.report.dropped and conv.report.resampled == []
    _, incompatible = _load(SOFTMAX_CFG, overrides, tmp_path / "out.pth")
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    assert all(".rel_pos_" in k for k in incompatible.missing_keys if k.startswith("backbone.net."))


def test_softmax_source_into_karat_config_reports_new_operators(tmp_path):
    _classifier(tmp_path / "cls.pth", karat_on=False)
    conv = convert_file(str(tmp_path / "cls.pth"), KARAT_CFG, tmp_path / "out.pth", KARAT_NET)
    new_ops = [k for k in conv.report.new if ".karat.operator." in k]
    assert len(new_ops) == 2 * 3  # two blocks x (weight, basis_scale, coefficients); the zero base has no w_b


def test_bad_inputs_are_clear_errors(tmp_path):
    other = timm.create_model("resnet10t", num_classes=10)
    save_checkpoint(other.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a ViT classifier checkpoint"):
        convert_file(str(tmp_path / "resnet.pth"), KARAT_CFG, tmp_path / "a.pth", KARAT_NET)

    _classifier(tmp_path / "wide.pth", embed_dim=48)
    with pytest.raises(ValueError, match="embed_dim 48 \\(checkpoint\\) vs 32 \\(config\\)"):
        convert_file(str(tmp_path / "wide.pth"), KARAT_CFG, tmp_path / "b.pth", KARAT_NET)

    _classifier(tmp_path / "cls.pth")
    with pytest.raises(ValueError, match="softmax ViT; use a KArAt config"):
        convert_file(str(tmp_path / "cls.pth"), SOFTMAX_CFG, tmp_path / "c.pth", NET)
    with pytest.raises(ValueError, match="grid=2 \\(checkpoint\\) vs 3 \\(config\\)"):
        convert_file(str(tmp_path / "cls.pth"), KARAT_CFG, tmp_path / "d.pth",
                     NET + ["model.backbone.net.karat.hidden_dim=4"])

    # Operators for 50 keys in a checkpoint that says 8 x 8 tokens: nothing to resample them from.
    ckpt = karat.load_checkpoint(tmp_path / "cls.pth")
    for k in list(ckpt["model"]):
        if ".karat.operator." in k:
            ckpt["model"][k] = ckpt["model"][k][:, :50]
    save_checkpoint(ckpt, tmp_path / "bad_tokens.pth")
    with pytest.raises(ValueError, match="another token count"):
        convert_file(str(tmp_path / "bad_tokens.pth"), KARAT_CFG, tmp_path / "e.pth", KARAT_NET)

    (tmp_path / "exists.pth").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_file(str(tmp_path / "cls.pth"), KARAT_CFG, tmp_path / "exists.pth", KARAT_NET)
    assert (tmp_path / "exists.pth").read_bytes() == b"mine"


def test_command_line(tmp_path, capsys):
    from tools import convert_to_detectron2 as tool
    _classifier(tmp_path / "cls.pth")
    rc = tool.main([str(tmp_path / "cls.pth"), "--config-file", KARAT_CFG, "--output", str(tmp_path / "o.pth"),
                    *KARAT_NET])
    out = capsys.readouterr().out
    assert rc == 0 and "resampled:" in out and "newly initialised:" in out and "train.init_checkpoint=" in out
    assert tool.main([str(tmp_path / "cls.pth"), "--config-file", KARAT_CFG, "--output", str(tmp_path / "o.pth"),
                      *KARAT_NET]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_vit_base_classifier_to_the_coco_config(tmp_path):
    """The headline transfer: a KArAt ViT-B/16 classifier (197 tokens) -> ViTDet-B at 1024 px: windows 196, global
    blocks 64 x 64 = 4096."""
    kwargs = dict(grid=1, hidden_dim=12, blockwise=True)
    model = timm.create_model("vit_base_patch16_224_karat", **kwargs)
    save_checkpoint(dict(model=model.state_dict(), model_name="vit_base_patch16_224_karat", model_kwargs=kwargs),
                    tmp_path / "cls.pth")
    del model
    cfg = str(ROOT / "configs/COCO/mask_rcnn_vitdet_karat_b_blockwise_100ep.py")
    conv = convert_file(str(tmp_path / "cls.pth"), cfg, tmp_path / "out.pth")
    text = conv.describe()
    # 3 tensors per operator (weight, w_s, coefficients; the zero base has no w_b): 8 windowed + 4 global blocks
    assert "Resampled 24 KArAt tensors from 197 tokens (1 prefix + 14x14) to 196 tokens (0 prefix + 14x14)" in text
    assert "Resampled 12 KArAt tensors from 197 tokens (1 prefix + 14x14) to 4096 tokens (0 prefix + 64x64)" in text
    assert conv.state_dict["backbone.net.blocks.2.attn.karat.operator.weight"].shape == (12, 4096, 12)
    assert conv.state_dict["backbone.net.pos_embed"].shape == (1, 197, 768)  # pretrain_img_size 224, class token
    assert all(".rel_pos_" in k for k in conv.report.new) and len(conv.report.new) == 24
