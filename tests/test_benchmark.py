"""The benchmark script runs every implementation side by side and reports memory and speed ratios."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_attention_level_small(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--level", "attention",
                           "--tokens", "197", "--batch", "4", "--repeat", "1", "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    impls = {r["impl"]: r for r in data["results"]}
    assert set(impls) == {"softmax", "reference", "efficient"}
    assert all("error" not in r and r["peak_mb"] > 0 and r["seconds"] > 0 for r in impls.values())
    assert impls["efficient"]["peak_mb"] < 0.5 * impls["reference"]["peak_mb"]
    assert "| attention | tiny | 197 | 4 | efficient |" in proc.stdout
    # never overwrites a result file
    again = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--json", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr


@pytest.mark.slow
def test_benchmark_compiles_every_case_and_compares_compiled_with_compiled(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "tools.benchmark", "--level", "attention", "--tokens", "17",
                           "--batch", "2", "--repeat", "1", "--rounds", "1", "--impl", "softmax", "efficient",
                           "--compile", "aot_eager", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["impl"], r["compile"], r["warmup"]) for r in results] == [("softmax", "aot_eager", 3),
                                                                         ("efficient", "aot_eager", 3)]
    assert all("error" not in r for r in results)
    assert "| efficient + compile (aot_eager) | efficient" in proc.stdout
    speed = proc.stdout.split("| efficient + compile (aot_eager) |")[1].split("|")[5].strip()
    assert speed.endswith("x") and speed != "-"  # its ratio is to the compiled softmax row of the same run
