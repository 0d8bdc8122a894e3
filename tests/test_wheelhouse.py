"""The offline wheelhouse end to end: tools/wheelhouse.py fills a folder from the registry for this machine's
Python, and tools/install_offline.sh installs it into a fresh virtual environment with the network cut off
(its own network namespace where the machine allows one, and `pip --no-index` in any case). The install must
import karat, detectron2's ViTDet, mmseg and mmdet.

Two things are reused rather than paid for twice:

* mmcv: the environment already compiled mmcv 2.1.0 (9 minutes on 2 cores) and pip's wheel cache holds that
  wheel; it goes into the wheelhouse beside the source archive, and install_offline.sh takes a prebuilt mmcv
  wheel that loads with the environment's torch instead of compiling one.
* torch: the fresh environment must not download 2.6 GB again. The wheelhouse's manifest lists what a target
  environment provides (torch, torchvision, triton and everything they require, OpenCV, and scipy here, as on
  the GPU node). The test makes a folder with symbolic links to exactly those distributions of the project's
  environment (their packages and their ``.dist-info``), and a ``.pth`` file in the fresh environment's
  site-packages adds that one folder to its ``sys.path``. Python imports torch from there and pip sees those
  distributions as installed (pip reads metadata on all of ``sys.path``), while nothing else of the project's
  environment (timm, mmcv, detectron2, karat, ...) is visible: those can only come from the wheelhouse.
  ``--system-site-packages`` would not do: the base interpreter has no torch, and pointing the ``.pth`` at the
  whole site-packages would expose everything.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


def _run(cmd, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{cmd[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def _cached_mmcv_wheel(dest: Path) -> Path:
    """The mmcv wheel this environment installed, from pip's wheel cache (built once by tools/setup_env.sh)."""
    import mmcv

    listing = subprocess.run([sys.executable, "-m", "pip", "cache", "list", "mmcv", "--format=abspath"],
                             capture_output=True, text=True).stdout.split()
    found = [Path(p) for p in listing if Path(p).name.startswith(f"mmcv-{mmcv.__version__}-")]
    if found:
        return found[0]
    # Not in the cache listing: let pip rebuild it (it takes the cached build where it has one).
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dest,
          f"mmcv=={mmcv.__version__}"], timeout=1800, env=dict(os.environ, MMCV_WITH_OPS="1", FORCE_CUDA="0"))
    return next(dest.glob("mmcv-*.whl"))


def _expose(names: Iterable[str], folder: Path) -> None:
    """Symbolic links in ``folder`` to the installed files of these distributions of this environment."""
    folder.mkdir()
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # e.g. a requirement for another platform
        site = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            link = folder / top
            if (site / top).exists() and not link.exists():
                link.symlink_to(site / top)


def _offline_prefix() -> list:
    """`unshare -n` (a network namespace with no network) where the machine allows it, else nothing."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


@pytest.mark.slow
def test_wheelhouse_installs_offline_into_a_fresh_environment(tmp_path):
    t0 = time.time()
    house = tmp_path / "wheelhouse"
    had_build = (ROOT / "build").exists()
    proc = _run([sys.executable, ROOT / "tools" / "wheelhouse.py", "--dest", house, "--provided", "scipy"],
                timeout=900, cwd=tmp_path)
    assert "MiB  total" in proc.stdout
    assert had_build or not (ROOT / "build").exists(), "building karat's wheel left build/ in the checkout"
    built_s = time.time() - t0
    manifest = json.loads((house / "manifest.json").read_text())
    names = {f["name"] for f in manifest["files"]}
    assert manifest["target"]["python_version"] == "%d.%d" % sys.version_info[:2]
    assert manifest["total_bytes"] == sum((house / n).stat().st_size for n in names) < 64 * MIB
    for prefix in ("timm-", "fvcore-", "einops-", "iopath-", "omegaconf-", "hydra_core-", "yacs-", "pycocotools-",
                   "mmengine-", "mmsegmentation-", "mmdet-", "mmcv-2.1.0.tar.gz", "setuptools-", "ninja-", "psutil-",
                   "wheel-", "detectron2-0.7.2-py3-none-any.whl", "karat-"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert not any(n.startswith(("torch-", "torchvision-", "triton-", "nvidia_", "scipy-")) for n in names)
    assert {"torch", "torchvision", "triton", "numpy", "opencv-python", "scipy"} <= set(manifest["provided"])

    # A second run into the same folder is refused; nothing is overwritten silently.
    again = subprocess.run([sys.executable, ROOT / "tools" / "wheelhouse.py", "--dest", house], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode != 0 and "exists" in again.stderr

    shutil.copy2(_cached_mmcv_wheel(tmp_path), house)  # beside the source archive: no second compile

    venv = tmp_path / "fresh"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv], timeout=300)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60).stdout.strip())
    _expose(manifest["provided"], tmp_path / "provided")  # the closure, as the tool computed it
    (site / "karat-provided-torch.pth").write_text(str(tmp_path / "provided") + "\n")
    _run([py, "-c", "import torch, torchvision, cv2"], 300)
    assert subprocess.run([py, "-c", "import timm"], capture_output=True).returncode != 0  # only from the house

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PYTHON=str(py), PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1", OMP_NUM_THREADS="1",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    t1 = time.time()
    proc = _run([*_offline_prefix(), "bash", ROOT / "tools" / "install_offline.sh", house], timeout=1200,
                cwd=tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert "mmcv from the prebuilt mmcv-2.1.0-" in out, out[-3000:]
    assert "[install_offline] ok:" in out, out[-3000:]

    # The fresh environment, from outside the checkout: everything from the wheelhouse, torch from the link.
    check = ("import karat, detectron2, mmseg, mmdet, mmcv, timm, torch; from mmcv import _ext; "
             "from detectron2.modeling.backbone.vit import ViT; from detectron2_plugin import KArAtViT; "
             "import mmseg.models, mmdet.models; "
             "print(karat.__file__, timm.__file__, torch.__file__, detectron2.__file__)")
    paths = _run([py, "-c", check], 300, cwd=tmp_path, env=env).stdout.split()
    assert all(p.startswith(str(site)) for p in paths[:2]) and paths[3].startswith(str(site)), paths
    assert paths[2].startswith(str(tmp_path / "provided")), paths
    print(f"wheelhouse built in {built_s:.0f} s, installed offline in {time.time() - t1:.0f} s, "
          f"{manifest['total_bytes'] / MIB:.1f} MiB")


@pytest.mark.slow
def test_gpu_node_wheelhouse_is_cp312_and_fits_64_mib(tmp_path):
    """The folder for our GPU node (CPython 3.12, which has its own torch and scipy) stays under 64 MiB and holds
    only wheels that load there: cp312, abi3 or pure Python, besides mmcv's source archive."""
    house = tmp_path / "node"
    proc = _run([sys.executable, ROOT / "tools" / "wheelhouse.py", "--gpu-node", "--dest", house], timeout=900,
                cwd=tmp_path)
    manifest = json.loads((house / "manifest.json").read_text())
    assert manifest["target"]["python_version"] == "3.12" and "scipy" in manifest["provided"]
    assert manifest["total_bytes"] < 64 * MIB and "limit 64 MiB" in proc.stdout
    for f in manifest["files"]:
        name = f["name"]
        assert name.endswith(".whl") or name == "mmcv-2.1.0.tar.gz", name
        if name.endswith(".whl"):
            python_tag, abi_tag = name[:-4].split("-")[-3:-1]
            assert "cp312" in python_tag or abi_tag in ("abi3", "none"), name
    assert any(f["name"] == "detectron2-0.7.2-py3-none-any.whl" for f in manifest["files"])
