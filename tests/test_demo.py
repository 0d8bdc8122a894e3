"""`make demo`'s program end to end, shortened: both models train, and everything is written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from karat import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_and_writes_its_outputs(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--output-dir", str(out),
                           "--epochs", "2", "--train-limit", "256", "--quick"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| karat (vit_tiny_patch16_224_karat)" in proc.stdout and "| softmax" in proc.stdout
    assert "## detection" in proc.stdout and "## segmentation" in proc.stdout  # the transfer stages ran
    stages = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in stages["detection"]["rows"]] == ["karat", "softmax"]
    assert all(0 <= r["mIoU"] <= 100 for r in stages["segmentation"]["rows"])
    out = out / "classification"
    summary = json.loads((out / "summary.json").read_text())
    by_name = {r["name"]: r for r in summary["results"]}
    assert by_name["karat"]["params"] > by_name["softmax"]["params"]
    assert all(len(r["history"]) == 2 for r in summary["results"])
    assert (out / "learning_curves.png").stat().st_size > 10_000
    assert (out / "attention_maps.png").stat().st_size > 10_000
    for name in ("karat", "softmax"):
        ckpt = load_checkpoint(out / name / "checkpoint.pth")
        assert ckpt["epoch"] == 1 and "model" in ckpt and "optimizer" in ckpt
        assert len((out / name / "log.txt").read_text().splitlines()) == 2
        assert any((out / name / "tensorboard").iterdir())


def test_demo_refuses_to_overwrite_a_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not empty" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
