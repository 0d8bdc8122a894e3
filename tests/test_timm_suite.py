"""timm's own model test-suite passes for the KArAt models.

timm's ``tests/test_models.py`` ships in the source distribution of the installed timm version. It is fetched with
pip (``pip download --no-deps --no-binary :all: timm==<version>``) into ``~/.cache/karat/timm-sdist`` (or
``$KARAT_TIMM_SDIST_CACHE``), reused when present, and never copied into this repository. pytest runs it in a
subprocess with ``-p karat``: importing karat as a plugin registers our models before timm's test module enumerates
``list_models()`` at collection time.

CI selects the Tiny model of each family (ViT, Swin, ConViT: every code path, ~1 CPU-minute); set
``KARAT_TIMM_SUITE=all`` for all nine models (ViT/Swin/ConViT-Ti/S/B, ~6 CPU-minutes).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

import karat  # noqa: F401  registers the KArAt models
from conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
SELECTION = "karat and not pretrained and not torchscript"


def sdist_tests(version: str) -> Path:
    """The extracted ``timm-<version>/`` folder holding ``tests/`` and timm's pytest config (fetched once)."""
    cache = Path(os.environ.get("KARAT_TIMM_SDIST_CACHE", Path.home() / ".cache" / "karat" / "timm-sdist"))
    root = cache / f"timm-{version}"
    if (root / "tests" / "test_models.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"timm=={version}",
               "-d", tmp, "--disable-pip-version-check", "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        archives = list(Path(tmp).glob(f"timm-{version}.tar.gz"))
        if proc.returncode or not archives:
            message = f"could not download timm {version}'s source distribution: {proc.stderr[-1500:]}"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        with tarfile.open(archives[0]) as tar:
            wanted = [m for m in tar.getmembers()
                      if m.name.startswith(f"timm-{version}/tests/") or m.name == f"timm-{version}/pyproject.toml"]
            tar.extractall(tmp, members=wanted, filter="data")
        os.replace(Path(tmp) / f"timm-{version}", root)  # atomic: a half-extracted folder is never reused
    return root


@pytest.mark.slow
def test_timm_model_suite_passes_for_karat_models(tmp_path):
    everything = os.environ.get("KARAT_TIMM_SUITE", "") == "all"
    selection = SELECTION if everything else f"{SELECTION} and tiny"
    models = [m for m in timm.list_models("*_karat") if everything or "tiny" in m]
    suite = sdist_tests(timm.__version__)
    report = tmp_path / "junit.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", str(suite / "tests" / "test_models.py"), "-p", "karat", "-k", selection,
           "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}"]
    proc = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=3600)
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = list(ET.parse(report).getroot().iter("testcase"))
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = {c.get("name"): c.find("skipped").get("message") for c in cases if c.find("skipped") is not None}
    print(f"timm {timm.__version__} test_models.py -k '{selection}': {len(cases)} ran, {len(failed)} failed, "
          f"{len(skipped)} skipped {skipped or ''}")
    assert not failed, f"timm's tests failed for KArAt models: {failed}\n{proc.stdout[-6000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert len(cases) - len(skipped) > 0
    names = " ".join(c.get("name") for c in cases)
    unselected = [m for m in models if m not in names]
    assert not unselected, f"timm's suite did not select {unselected}"
