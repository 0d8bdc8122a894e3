"""`make demo`'s program end to end, shortened: both models train, and everything is written."""
import io
import json
import re
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


def test_training_log_file_gets_one_line_per_epoch_not_a_bar(tmp_path):
    """The demo's classification run written to a file (not a terminal, as ``make demo > log``): no tqdm redraws
    (one line per iteration there), exactly one line per epoch."""
    from classification.demo import DEMO_MODELS, DemoSettings

    argv = DemoSettings(epochs=2, batch_size=16, train_limit=64).command_line(tmp_path / "run") + DEMO_MODELS["softmax"]
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "classification.main", *argv], stdout=f, stderr=subprocess.STDOUT,
                              cwd=ROOT, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "it/s" not in text, text[-2000:]
    assert re.findall(r"\bepoch (\d+)\b", text) == ["0", "1"], text[-2000:]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, drawn", [(_Terminal, True), (io.StringIO, False)], ids=["terminal", "file"])
def test_training_bar_is_drawn_on_a_terminal_only(monkeypatch, stream, drawn):
    import torch

    from classification.engine import train_one_epoch

    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    model = torch.nn.Linear(4, 3)
    loader = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(3)]
    train_one_epoch(model, loader, torch.nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), 0,
                    desc="tiny")
    assert ("tiny epoch 0" in err.getvalue()) == drawn
