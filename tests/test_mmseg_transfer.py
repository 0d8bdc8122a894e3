"""Classification checkpoints -> mmseg backbone checkpoints (tools/convert_to_mmseg.py), loading them, and the
demo's segmentation stage."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
DIGITS = dict(img_size=8, patch_size=2, in_chans=1, class_token=False, global_pool="avg", num_classes=10,
              embed_dim=48, depth=2, num_heads=3)
KARAT = dict(basis_type="FourierBasis", grid=3, hidden_dim=12, modular_mode="phi1_w2", blockwise=True)


def classifier(tmp_path: Path, karat: bool, **overrides) -> Path:
    """A checkpoint in the format of classification.main / the demo (a small ViT on 8 x 8 grey digits)."""
    import timm

    import karat as _  # noqa: F401
    from karat.checkpoint import save_checkpoint

    name = "vit_tiny_patch16_224_karat" if karat else "vit_tiny_patch16_224"
    kwargs = dict(DIGITS, **(KARAT if karat else {}), **overrides)
    model = timm.create_model(name, **kwargs)
    path = tmp_path / f"{'karat' if karat else 'softmax'}.pth"
    save_checkpoint(dict(model=model.state_dict(), model_name=name, model_kwargs=kwargs), path)
    return path


def test_convert_cli_report_and_overwrite(mmseg_backbones, tmp_path, capsys):
    src = classifier(tmp_path, karat=True)
    out = tmp_path / "backbone.pth"
    cmd = [sys.executable, "-W", "ignore", str(REPO / "tools" / "convert_to_mmseg.py"), str(src), str(out),
           "--img-size", "16"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resampled" in r.stdout and "16 tokens (0 prefix + 4x4) to 64 (0 prefix + 8x8)" in r.stdout
    assert "1 input channel(s) adapted to 3" in r.stdout
    before = out.read_bytes()
    from tools.convert_to_mmseg import main

    assert main([str(src), str(out), "--img-size", "16"]) == 2  # exists: refused, untouched
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main([str(src), str(out), "--img-size", "16", "--overwrite"]) == 0
    not_vit = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, not_vit)
    assert main([str(not_vit), str(tmp_path / "x.pth")]) == 2
    assert "not a ViT" in capsys.readouterr().err and not (tmp_path / "x.pth").exists()


def test_converted_checkpoint_loads_with_init_cfg_and_load_from(mmseg_backbones, tmp_path):
    from mmseg_configs.export import convert_classifier

    from karat.checkpoint import load_checkpoint

    out = tmp_path / "karat_mmseg.pth"
    report = convert_classifier(str(classifier(tmp_path, karat=True)), out, img_size=(16, 16))
    assert any(".karat.operator." in k for k in report.resampled)
    meta = load_checkpoint(out)["meta"]["backbone"]
    kwargs = {k: v for k, v in meta.items() if k not in ("type", "karat_cfg")}
    model = mmseg_backbones.KArAtVisionTransformer(**kwargs, karat_cfg=meta["karat_cfg"],
                                           init_cfg=dict(type="Pretrained", checkpoint=str(out)))
    model.init_weights()
    assert model.load_report.new == [] and model.num_tokens == 64  # a converted KArAt checkpoint: nothing new
    # load_from: the runner's loader takes the backbone.* keys into a whole segmentor
    from mmengine.runner.checkpoint import _load_checkpoint_to_model

    seg = torch.nn.Module()
    seg.backbone = mmseg_backbones.KArAtVisionTransformer(**kwargs, karat_cfg=meta["karat_cfg"])
    _load_checkpoint_to_model(seg, load_checkpoint(out), strict=True)
    torch.testing.assert_close(seg.backbone.layers[1].attn.karat.operator.weight,
                               model.layers[1].attn.karat.operator.weight)

    soft = tmp_path / "soft_mmseg.pth"
    convert_classifier(str(classifier(tmp_path, karat=False)), soft, img_size=(16, 16))
    model = mmseg_backbones.KArAtVisionTransformer(**kwargs, karat_cfg=meta["karat_cfg"],
                                           init_cfg=dict(type="Pretrained", checkpoint=str(soft)))
    model.init_weights()  # a softmax backbone starts a KArAt one: only the KArAt tensors are new
    assert model.load_report.new and all(".karat.operator." in k for k in model.load_report.new)


def test_convert_with_class_token_to_512px(mmseg_backbones, tmp_path):
    """The segmentation token count of the configs: 32 x 32 patches + class token at 512 px."""
    from mmseg_configs.export import convert_classifier

    src = classifier(tmp_path, karat=True, class_token=True, global_pool="token", img_size=32, patch_size=16,
                     in_chans=3)
    out = tmp_path / "b.pth"
    report = convert_classifier(str(src), out, img_size=(512, 512))
    state = torch.load(out, weights_only=True)["state_dict"]
    assert state["backbone.layers.0.attn.karat.operator.weight"].shape[1] == 32 * 32 + 1
    assert state["backbone.pos_embed"].shape[1] == 32 * 32 + 1
    assert "pos_embed" in report.resampled


@pytest.mark.slow
def test_demo_stage_quick(mmseg_backbones, tmp_path, capfd):
    """The stage's log says what the transfer loaded and what is new, and no wall of mmengine's "missing keys" for
    the neck and decode head (the backbone checkpoint is loaded into the backbone, strictly)."""
    from mmseg_configs.demo import run_stage, summary_table

    ckpts = {"karat": classifier(tmp_path, karat=True, depth=4), "softmax": classifier(tmp_path, karat=False, depth=4)}
    rows = run_stage(tmp_path / "seg", ckpts, quick=True)
    log = "".join(capfd.readouterr())
    assert "missing keys in source state_dict" not in log and "do not match exactly" not in log
    assert log.count("loaded as is:") == 2 and log.count("newly initialised:") == 2, log[-3000:]
    assert [r["name"] for r in rows] == ["karat", "softmax"]
    for r in rows:
        assert 0.0 <= r["mIoU"] <= 100.0 and 0.0 < r["aAcc"] <= 100.0 and r["iterations"] == 2
    assert "| karat |" in summary_table(rows)
    with pytest.raises(ValueError, match="Unknown backbone"):
        run_stage(tmp_path / "seg2", {"other": ckpts["karat"]}, quick=True)
