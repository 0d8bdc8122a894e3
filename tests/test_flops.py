"""FLOP counts in the paper's convention (fvcore multiply-adds, softmax as thop counts it, N_q N r (3G+1) per KArAt
head)."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import karat  # noqa: F401
from karat.flops import count_flops

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("name, heads, classes, grid, softmax, karat_total", [
    ("tiny", 3, 10, 3, 1.262, 1.425),
    ("small", 6, 1000, 3, 4.614, 4.941),  # the spec's ViT-Small figures fit a 1000-class head
    ("base", 12, 10, 1, 17.595, 17.847),
])
def test_flops_reproduce_the_paper(name, heads, classes, grid, softmax, karat_total):
    x = torch.randn(1, 3, 224, 224)
    base = count_flops(timm.create_model(f"vit_{name}_patch16_224", num_classes=classes), x)
    kar = count_flops(timm.create_model(f"vit_{name}_patch16_224_karat", num_classes=classes, grid=grid,
                                        blockwise=True), x)
    assert base["total"] == pytest.approx(softmax, abs=0.01)
    assert kar["total"] == pytest.approx(karat_total, abs=0.01)
    # the rest of the KArAt model is the softmax model without its softmax (12 blocks x heads x 197 rows, thop's 3n - 1)
    assert base["total"] - kar["rest"] == pytest.approx(12 * heads * 197 * (3 * 197 - 1) / 1e9, abs=1e-9)


def test_operator_count_follows_the_convention_and_leaves_the_model_as_it_was():
    model = timm.create_model("vit_tiny_patch16_224_karat", img_size=32, patch_size=8, depth=2, num_classes=3)
    flops = count_flops(model, torch.randn(1, 3, 32, 32))
    assert flops["karat"] * 1e9 == pytest.approx(2 * 3 * 17 * 17 * 12 * (3 * 3 + 1))  # blocks x heads x N^2 r (3G+1)
    assert all(b.attn.karat.cfg.impl == "auto" for b in model.blocks)
    assert all(not op._forward_hooks for op in model.modules() if isinstance(op, karat.KArAtOperator))


def test_flops_cli():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "flops.py"), "--model", "vit_tiny_patch16_224_karat",
                           "--num-classes", "10", "--input-size", "32", "--karat", "grid=2", "universal=true"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| vit_tiny_patch16_224_karat |" in proc.stdout
