"""``python -m karat.timm_script SCRIPT.py ARGS...`` runs a timm script with the KArAt models registered (issue 21).

timm's own scripts are not copied here: the scripts below are written by the test and call the timm functions those
scripts use (``timm.create_model``, ``timm.utils.ParseKwargs``-style argv parsing, ``timm.utils.onnx.onnx_export``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

REPO = Path(__file__).resolve().parents[1]

SCRIPT = '''
import argparse, sys, timm, torch
parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--img-size", type=int, default=32)
args = parser.parse_args()
assert __name__ == "__main__"
model = timm.create_model(args.model, img_size=args.img_size, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                          num_classes=3).eval()
print("OUT", tuple(model(torch.randn(1, 3, args.img_size, args.img_size)).shape), type(model).__name__, sys.argv[0])
'''


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "karat.timm_script", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_script_sees_karat_models(tmp_path):
    script = tmp_path / "validate.py"
    script.write_text(SCRIPT)
    done = _run(str(script), "--model", "vit_tiny_patch16_224_karat", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"OUT (1, 3) KArAtVisionTransformer {script}" in done.stdout


@pytest.mark.slow
def test_without_the_runner_timm_does_not_know_the_models(tmp_path):
    """What the runner is for: the same script run plainly fails to find the model."""
    script = tmp_path / "validate.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), "--model", "vit_tiny_patch16_224_karat"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Unknown model" in done.stderr


@pytest.mark.slow
def test_timm_onnx_export_helper(tmp_path):
    """timm's onnx_export.py calls ``timm.utils.onnx.onnx_export``: a KArAt model exports through it (TorchScript
    exporter, dynamic batch) and ONNX Runtime runs it."""
    require("onnxruntime")
    script = tmp_path / "onnx_export.py"
    script.write_text('''
import sys, numpy as np, onnxruntime as ort, timm, torch
from timm.utils.onnx import onnx_export
model = timm.create_model("vit_tiny_patch16_224_karat", img_size=32, patch_size=4, embed_dim=16, depth=1,
                          num_heads=2, num_classes=3).eval()
onnx_export(model, sys.argv[1], input_size=(3, 32, 32), batch_size=2, dynamic_size=False, check=True)
x = torch.randn(3, 3, 32, 32)
got = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"]).run(None, {"input0": x.numpy()})[0]
with torch.no_grad():
    np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)
print("MATCH")
''')
    done = _run(str(script), str(tmp_path / "m.onnx"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MATCH" in done.stdout


def test_missing_script_is_a_clear_error(tmp_path):
    from karat.timm_script import main

    with pytest.raises(SystemExit, match="pytorch-image-models"):
        main([str(tmp_path / "validate.py")])
