"""karat.analysis end to end: checkpoints of all three hosts read back as the same timm ViT, image folders, the
``--keep-every`` checkpoints, and the command writing all six figure families."""
import json

import numpy as np
import pytest
import timm
import torch

import karat  # noqa: F401
from conftest import require
from karat import load_checkpoint, save_checkpoint
from karat.analysis import attention
from karat.analysis.cli import main
from karat.analysis.images import load_image_folder
from karat.analysis.load import load_model

TINY = dict(img_size=8, patch_size=2, embed_dim=24, depth=2, num_heads=3, num_classes=10, in_chans=1,
            class_token=False, global_pool="avg")


def _classifier(path, karat_on=True, **kw):
    name = "vit_tiny_patch16_224_karat" if karat_on else "vit_tiny_patch16_224"
    kwargs = {**TINY, **kw}
    model = timm.create_model(name, **kwargs).eval()
    save_checkpoint(dict(model=model.state_dict(), model_name=name, model_kwargs=kwargs, epoch=1,
                         args=dict(data_set="DIGITS", seed=0)), path)
    return model


def _same_attention(a, b, x):
    ra, rb = attention.record_attention(a, x), attention.record_attention(b, x)
    assert ra.karat_heads == rb.karat_heads
    for ma, mb in zip(ra.maps, rb.maps):
        torch.testing.assert_close(ma, mb, atol=1e-5, rtol=1e-5)


def test_classification_checkpoint_reads_back_as_trained(tmp_path):
    model = _classifier(tmp_path / "c.pth")
    loaded = load_model(str(tmp_path / "c.pth"))
    assert loaded.host == "classification" and loaded.is_karat and loaded.dataset == "DIGITS"
    assert loaded.mean == (0.3,) and loaded.has_head
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded.model(x), model(x))
    with pytest.raises(ValueError, match="none of the checkpoints"):
        save_checkpoint({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
        load_model(str(tmp_path / "other.pth"))


@pytest.mark.slow
def test_mmseg_backbone_maps_back_to_the_same_vit(tmp_path):
    require("mmseg")
    from mmseg_configs.export import convert_classifier

    model = _classifier(tmp_path / "c.pth", mixed_head=True, num_attention=2)
    convert_classifier(str(tmp_path / "c.pth"), tmp_path / "seg.pth", img_size=(8,), in_channels=1)
    loaded = load_model(str(tmp_path / "seg.pth"))
    assert loaded.host == "mmseg" and loaded.is_karat and not loaded.has_head
    assert loaded.model.karat_cfg.num_attention == 2
    for k, v in loaded.model.state_dict().items():
        if k.startswith("blocks."):
            torch.testing.assert_close(v, model.state_dict()[k], msg=k)
    _same_attention(model, loaded.model, torch.randn(2, 1, 8, 8))


def test_detectron2_backbone_maps_back_to_the_same_vit(tmp_path):
    require("detectron2")
    from detectron2_plugin.backbone import KArAtViT
    from detectron2_plugin.convert import convert
    from karat.transfer import load_vit_source

    model = _classifier(tmp_path / "c.pth")
    net = KArAtViT(img_size=8, patch_size=2, in_chans=1, embed_dim=24, depth=2, num_heads=3, pretrain_img_size=8,
                   pretrain_use_cls_token=False, karat={})
    conv = convert(load_vit_source(str(tmp_path / "c.pth")), net)
    save_checkpoint(dict(model=conv.state_dict), tmp_path / "det.pth")
    loaded = load_model(str(tmp_path / "det.pth"))
    assert loaded.host == "detectron2" and loaded.is_karat and not loaded.has_head
    _same_attention(model, loaded.model, torch.randn(2, 1, 8, 8))
    # a windowed block (2 x 2 windows: 4 keys) becomes a global block of the 4 x 4 grid, and says so
    net = KArAtViT(img_size=8, patch_size=2, in_chans=1, embed_dim=24, depth=2, num_heads=3, pretrain_img_size=8,
                   pretrain_use_cls_token=False, window_size=2, window_block_indexes=[0], karat={})
    save_checkpoint(dict(model={f"backbone.net.{k}": v for k, v in net.state_dict().items()}), tmp_path / "w.pth")
    loaded = load_model(str(tmp_path / "w.pth"))
    assert loaded.model.blocks[0].attn.karat.num_tokens == 16
    assert any("window attention of blocks [0]" in n for n in loaded.notes)


def test_image_folder_with_classes(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            pixels = np.full((20, 12, 3), 255 if c == "dog" else 0, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / c / f"{i}.png")
    data = load_image_folder(str(tmp_path), (8, 8), 1, (0.5,), (0.5,))
    assert data.images.shape == (4, 1, 8, 8) and data.labels.tolist() == [0, 1, 0, 1] and data.classes == ["cat", "dog"]
    torch.testing.assert_close(data.images[0], torch.full((1, 8, 8), -1.0))
    torch.testing.assert_close(data.images[1], torch.full((1, 8, 8), 1.0))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_image_folder(str(tmp_path / "missing"), (8, 8), 1, (0.5,), (0.5,))


def test_keep_every_keeps_loadable_epoch_weights(tmp_path):
    from classification.main import keep_epoch_weights

    state = dict(model={"w": torch.ones(2)}, optimizer={}, epoch=0, model_name="m", model_kwargs={}, args={})
    for epoch in range(5):
        keep_epoch_weights(dict(state, epoch=epoch), tmp_path, epoch, every=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-epoch001.pth", "checkpoint-epoch003.pth"]
    kept = load_checkpoint(tmp_path / "checkpoint-epoch003.pth")
    assert kept["epoch"] == 3 and "optimizer" not in kept and torch.equal(kept["model"]["w"], torch.ones(2))


@pytest.mark.slow
def test_command_writes_all_six_families(tmp_path, capsys):
    require("sklearn")
    run = tmp_path / "karat"
    model = _classifier(run / "checkpoint.pth")
    for epoch, scale in ((1, 0.9), (3, 0.95)):  # a made-up trajectory towards the final weights
        save_checkpoint(dict(model={k: v * scale for k, v in model.state_dict().items()}),
                        run / f"checkpoint-epoch{epoch:03d}.pth")
    _classifier(tmp_path / "softmax" / "checkpoint.pth", karat_on=False)
    out = tmp_path / "analysis"
    argv = [str(run / "checkpoint.pth"), "--compare", str(tmp_path / "softmax" / "checkpoint.pth"), "--out", str(out),
            "--grid", "3", "--points", "3", "--batches", "1", "--batch-size", "16", "--num-images", "8",
            "--no-progress"]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["1_functions.png", "2_attention_maps.png", "2_attention_rollout.png", "3_spectra.png",
                     "4_weights.png", "5_loss_landscape.png", "6_optimizer_path.png", "analysis.json"]
    result = json.loads((out / "analysis.json").read_text())
    for name in ("KArAt", "softmax"):
        r = result["landscape"][name]
        assert r["loss_1d"][1] == pytest.approx(r["centre_loss"], rel=1e-5)
        assert r["loss_2d"][1][1] == pytest.approx(r["centre_loss"], rel=1e-5)
    assert result["path"]["KArAt"]["epochs"] == [1, 3] and result["path"]["KArAt"]["explained"][0] == pytest.approx(1.0)
    assert "softmax: 0 checkpoint-epochNNN.pth" in result["skipped"]["path"]
    assert result["spectra"]["softmax"][0]["row_sum_mean"] == pytest.approx(1.0)
    assert len(result["functions"]["KArAt"]) == 2 * 3
    assert main(argv) == 2 and "already holds" in capsys.readouterr().err  # never overwritten silently
    assert main(argv[:-1] + ["--overwrite", "--families", "attention", "--blocks", "7"]) == 2
    assert "--blocks [7] do not exist: the model has blocks 0 to 1" in capsys.readouterr().err
