"""tools.resolution_study: the digits classifiers evaluated and fine-tuned at other input sizes; tools/benchmark.py's
--level size: what run-time resampling costs against a model built for the size."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from karat import save_checkpoint
from tools import resolution_study

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(patch_size=2, in_chans=1, class_token=False, global_pool="avg", img_size=8, num_classes=10,
            embed_dim=12, depth=1, num_heads=2)


def test_study_evaluates_and_finetunes_both_models_at_every_size(tmp_path, monkeypatch):
    for name, model_name, extra in (("karat", "vit_tiny_patch16_224_karat", dict(hidden_dim=4, grid=2)),
                                    ("softmax", "vit_tiny_patch16_224", {})):
        kwargs = dict(TINY, **extra)
        model = timm.create_model(model_name, **kwargs)
        (tmp_path / name).mkdir()
        save_checkpoint(dict(model=model.state_dict(), model_name=model_name, model_kwargs=kwargs),
                        tmp_path / name / "checkpoint.pth")
    # one fine-tuning step on 64 images keeps the test cheap; the tool's loop is the same
    real = resolution_study.load_digits_split

    def small(seed):
        train, val = real(seed=seed)
        train.images, train.targets = train.images[:64], train.targets[:64]
        return train, val

    monkeypatch.setattr(resolution_study, "load_digits_split", small)
    out = tmp_path / "study.json"
    assert resolution_study.main(["--checkpoints", str(tmp_path), "--sizes", "8", "12", "--batch-size", "64",
                                  "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for name in ("karat", "softmax"):
        assert set(data["results"][name]["as_trained"]) == {"8", "12"} and set(data["results"][name]["finetuned"])
        assert all(0 <= v <= 100 for v in data["results"][name]["as_trained"].values())
    assert "| KArAt ViT-Tiny |" in data["table"] and "12 px, fine-tuned" in data["table"]
    assert resolution_study.resized(torch.zeros(2, 1, 8, 8), 12).shape == (2, 1, 12, 12)


@pytest.mark.slow
def test_benchmark_size_level(tmp_path):
    out = tmp_path / "size.json"
    proc = subprocess.run([sys.executable, "-m", "tools.benchmark", "--level", "size", "--img-size", "64",
                           "--batch", "1", "--repeat", "1", "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"built for the size", "resampled at run time"}
    assert all(v["first_forward"] > 0 and v["forward"] > 0 and v["train_step"] > 0 for v in data["results"].values())
    assert data["forward_ratio"] > 0 and "| resampled at run time |" in proc.stdout
