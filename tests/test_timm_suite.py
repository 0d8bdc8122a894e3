"""timm's own model test-suite passes for the KArAt models.

timm's ``tests/test_models.py`` ships in the source distribution of the installed timm version. The environment
build fetches it (``python -m tools.timm_sdist``, pip) into ``~/.cache/karat/timm-sdist`` (``KARAT_CACHE``
overrides); it is never copied into this repository, and this test reads it from the cache without a network.
pytest runs it in a subprocess with ``-p karat``: importing karat as a plugin registers our models before timm's
test module enumerates ``list_models()`` at collection time.

CI selects the Tiny model of each family (ViT, Swin, ConViT: every code path, ~1 CPU-minute); set
``KARAT_TIMM_SUITE=all`` for all nine models (ViT/Swin/ConViT-Ti/S/B, ~6 CPU-minutes).
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List

import pytest
import timm

import karat  # noqa: F401  registers the KArAt models
from conftest import missing_dependency
from tools import timm_sdist

ROOT = Path(__file__).resolve().parents[1]
SELECTION = "karat and not pretrained and not torchscript"


def sdist_tests(version: str) -> Path:
    """timm's ``tests/`` from the cache that the environment build fills (``python -m tools.timm_sdist``): the test
    itself never downloads."""
    root = timm_sdist.cached(version)
    if root is None:
        missing_dependency(f"timm {version}'s test suite is not in {timm_sdist.cache_dir()}: `make env` fetches it "
                           f"(or run `python -m tools.timm_sdist`)")
    return root


FAMILIES = {"ViT": "vit_", "Swin": "swin_", "ConViT": "convit_"}  # each family's model names start so


def outcomes(report: Path, models: List[str]) -> Dict[str, Dict[str, Dict[str, str]]]:
    """``{family: {"passed" | "skipped" | "failed": {case: detail}}}`` from pytest's junit report, each case filed
    under the family of the KArAt model it ran (its parameter); a case naming none is filed under ``"other"``."""
    found: Dict[str, Dict[str, Dict[str, str]]] = {f: dict(passed={}, skipped={}, failed={})
                                                   for f in [*FAMILIES, "other"]}
    by_length = sorted(models, key=len, reverse=True)  # a longer name first, should one contain another
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        model = next((m for m in by_length if m in name), "")
        family = next((f for f, prefix in FAMILIES.items() if model.startswith(prefix)), "other") if model else "other"
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            found[family]["failed"][name] = (problem.get("message") or "")[:300]
        elif case.find("skipped") is not None:
            found[family]["skipped"][name] = case.find("skipped").get("message") or ""
        else:
            found[family]["passed"][name] = ""
    return found


def idle_families(found: Dict[str, Dict[str, Dict[str, str]]]) -> List[str]:
    """The families none of whose cases passed: a skipped case ran nothing."""
    return [family for family in FAMILIES if not found[family]["passed"]]


def summary(found: Dict[str, Dict[str, Dict[str, str]]]) -> str:
    lines = [f"{family}: {len(o['passed'])} passed, {len(o['skipped'])} skipped, {len(o['failed'])} failed"
             for family, o in found.items() if family in FAMILIES or any(o.values())]
    lines += [f"  skipped {case}: {reason}" for o in found.values() for case, reason in o["skipped"].items()]
    return "\n".join(lines)


@pytest.mark.slow
def test_timm_model_suite_passes_for_karat_models(tmp_path, record_property):
    everything = os.environ.get("KARAT_TIMM_SUITE", "") == "all"
    selection = SELECTION if everything else f"{SELECTION} and tiny"
    karat_models = timm.list_models("*_karat")
    models = [m for m in karat_models if everything or "tiny" in m]
    suite = sdist_tests(timm.__version__)
    report = tmp_path / "junit.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", str(suite / "tests" / "test_models.py"), "-p", "karat", "-k", selection,
           "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}"]
    proc = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=3600)
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    found = outcomes(report, karat_models)
    table = summary(found)
    record_property("timm_suite", table)
    print(f"timm {timm.__version__} test_models.py -k '{selection}':\n{table}")  # shown with -rP or -s
    failed = {case: detail for o in found.values() for case, detail in o["failed"].items()}
    assert not failed, f"timm's tests failed for KArAt models: {failed}\n{proc.stdout[-6000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:]
    names = " ".join(case for o in found.values() for kind in o.values() for case in kind)
    unselected = [m for m in models if m not in names]
    assert not unselected, f"timm's suite did not select {unselected}"
    idle = idle_families(found)
    assert not idle, f"no timm test case ran (passed) for the {idle} models; skipped are not run:\n{table}"


SKIP = '<skipped message="Fixed input size model &gt; limit."/>'
JUNIT = f"""<testsuites><testsuite name="pytest">
<testcase name="test_model_forward[vit_tiny_patch16_224_karat-2]"/>
<testcase name="test_model_backward[vit_tiny_patch16_224_karat-2]">{SKIP}</testcase>
<testcase name="test_model_forward[swin_tiny_patch4_window7_224_karat-2]">{SKIP}</testcase>
<testcase name="test_model_forward[convit_tiny_karat-2]"><failure message="shape mismatch"/></testcase>
</testsuite></testsuites>"""


def test_skipped_cases_are_reported_apart_and_run_no_family(tmp_path):
    """The check itself (no timm run): a family whose cases were all skipped, or failed, ran nothing."""
    (tmp_path / "junit.xml").write_text(JUNIT)
    found = outcomes(tmp_path / "junit.xml", timm.list_models("*_karat"))
    assert list(found["ViT"]["passed"]) == ["test_model_forward[vit_tiny_patch16_224_karat-2]"]
    assert found["ViT"]["skipped"] == {"test_model_backward[vit_tiny_patch16_224_karat-2]":
                                       "Fixed input size model > limit."}
    assert list(found["ConViT"]["failed"]) == ["test_model_forward[convit_tiny_karat-2]"]  # not a ViT case
    assert idle_families(found) == ["Swin", "ConViT"]
    table = summary(found)
    assert "ViT: 1 passed, 1 skipped, 0 failed" in table and "Swin: 0 passed, 1 skipped, 0 failed" in table
    assert "skipped test_model_forward[swin_tiny_patch4_window7_224_karat-2]: Fixed input size" in table
