"""make demo's detection stage, quick mode: both demo classifiers become ViTDet backbones, are fine-tuned with
detectron2's trainer and evaluated with COCOEvaluator (a few iterations)."""
import math

import pytest
import timm
import torch

from conftest import require

require("detectron2")
import karat  # noqa: E402,F401
from karat import save_checkpoint  # noqa: E402

# The demo's classifiers (classification/demo.py): ViT-Tiny, 8 x 8 grayscale digits, patch 2, no class token.
DIGITS = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, class_token=False, global_pool="avg")
KARAT = dict(basis_type="FourierBasis", grid=3, hidden_dim=12, modular_attn=True, modular_mode="phi1_w2",
             blockwise=True)


@pytest.mark.slow
def test_run_stage_quick(tmp_path):
    from detectron2_plugin.demo import run_stage, summary_table

    checkpoints = {}
    for name, model_name, kwargs in (("karat", "vit_tiny_patch16_224_karat", dict(DIGITS, **KARAT)),
                                     ("softmax", "vit_tiny_patch16_224", DIGITS)):
        model = timm.create_model(model_name, **kwargs)
        checkpoints[name] = save_checkpoint(dict(model=model.state_dict(), model_name=model_name,
                                                 model_kwargs=kwargs), tmp_path / f"{name}.pth")
    threads = torch.get_num_threads()
    rows = run_stage(tmp_path / "demo", checkpoints, quick=True)
    assert torch.get_num_threads() == threads  # the stage restores what it changed
    assert [r["name"] for r in rows] == ["karat", "softmax"]
    for row in rows:
        assert not math.isnan(row["box_ap"]) and not math.isnan(row["mask_ap"])  # COCOEvaluator ran both tasks
        assert row["seconds"] > 0 and row["iterations"] == 2
    karat_row = rows[0]
    assert karat_row["resampled"] == 1 + 4 * 3  # patch embedding (gray -> RGB) + 4 global blocks' operators (3 tensors)
    report = (tmp_path / "demo" / "karat" / "transfer_report.txt").read_text()
    assert "from 16 tokens (0 prefix + 4x4) to 256 tokens (0 prefix + 16x16)" in report
    assert "| karat |" in summary_table(rows)
    with pytest.raises(ValueError, match="No detection config"):
        run_stage(tmp_path / "other", {"swin": checkpoints["karat"]}, quick=True)
