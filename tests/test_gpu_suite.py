"""tools/gpu_suite.py's CPU mode: every stage of the GPU run at toy sizes (the fused kernels under Triton's
interpreter), so the run on the GPU node cannot fail on a typo. The report files must exist and hold numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[1]


def _suite(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_suite.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_every_stage_runs_tiny_on_the_cpu(tmp_path):
    for framework in ("triton", "detectron2", "mmseg"):
        require(framework)
    out = tmp_path / "gpu"
    proc = _suite("--cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = json.loads((out / "suite.json").read_text())
    assert {"env", "tests", "bench", "pipelines"} <= set(suite) and all(suite[s]["ok"] for s in
                                                                         ("env", "tests", "bench", "pipelines"))
    assert suite["env"]["result"]["torch"] and suite["env"]["result"]["triton"]

    tests = suite["tests"]["result"]
    assert tests["passed"] >= 4 and tests["failed"] == 0
    cases = tests["fused"]["cases"]
    assert {c["dtype"] for c in cases} == {"float32", "bfloat16", "float16"}
    assert all(0 <= e <= c["tolerance"] for c in cases for e in c["errors"].values())
    assert {"out", "dq", "dk", "dv"} <= set(cases[0]["errors"])
    assert len(tests["fused"]["compiled"]) == 15  # forward, dq, dk of 5 variants compiled for sm_90 without a GPU

    bench = suite["bench"]["result"]
    assert {r["impl"] for r in bench["attention"]} == {"softmax", "reference", "efficient", "fused"}
    assert all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in bench["attention"] + bench["model"])

    pipes = suite["pipelines"]["result"]
    assert pipes["classification"]["metrics"]["train_loss"] > 0
    assert pipes["detectron2"]["metrics"]["total_loss"] > 0 and pipes["detectron2"]["metrics"]["bbox_AP"] is not None
    assert pipes["mmseg"]["metrics"]["mIoU"] is not None and pipes["mmseg"]["metrics"]["loss"] > 0
    for name in ("classification", "detectron2", "mmseg", "tests"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0

    md = (out / "suite.md").read_text()
    for heading in ("## Environment", "## Fused kernels", "## Attention layer", "## Whole-model training step",
                    "## Pipelines"):
        assert heading in md
    assert "| attention | tiny | 17 | 2 | fused |" in md and "| mmseg | ok |" in md

    # A stage already in the folder is not overwritten silently.
    again = _suite("--cpu", "--out", str(out), "--stage", "env", timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_bench_plan_has_compiled_and_cuda_graph_rows_for_softmax_and_karat():
    """The bench stage ends with the ViT training step compiled by Inductor, in its default mode and with CUDA graphs
    (``reduce-overhead``), softmax and the fused KArAt path alike; each mode's rows get their ratio to softmax
    compiled the same way."""
    from tools import benchmark, gpu_suite

    cases = gpu_suite.compiled_cases("cuda")
    plan = {(c["model"], c["impl"], c["compile"], c.get("compile_mode")) for c in cases}
    assert plan == {(m, i, "inductor", mode) for m in ("tiny", "small") for i in ("softmax", "fused")
                    for mode in (None, "reduce-overhead")}
    assert all(c["level"] == "model" and c["warmup"] >= 3 for c in cases)  # compile, recompile, record the graphs
    timed = [dict(c, seconds=1.0, peak_mb=10.0, path="x",
                  items_per_s=(2.0 if c["impl"] == "fused" else 4.0) * (3 if c.get("compile_mode") else 1))
             for c in cases if c["model"] == "tiny"]
    rows = {line.split("|")[5].strip(): line for line in benchmark.table(timed).splitlines()[2:]}
    assert set(rows) == {"softmax + compile (inductor)", "fused + compile (inductor)",
                         "softmax + compile (inductor, reduce-overhead)", "fused + compile (inductor, reduce-overhead)"}
    assert "| 0.50x |" in rows["fused + compile (inductor, reduce-overhead)"]  # against softmax with CUDA graphs
    assert "| 0.50x |" in rows["fused + compile (inductor)"]
