#!/usr/bin/env python
"""Offline wheelhouse: everything KArAt needs beyond torch, for one target Python, in one folder.

Air-gapped clusters (and our GPU test node) have torch but no package registry. This tool, run where the
registry is reachable, fills one folder that ``tools/install_offline.sh DIR`` installs from with ``pip
--no-index``:

* wheels for timm, fvcore, einops, iopath, omegaconf, hydra-core, yacs, pycocotools, mmengine, mmsegmentation,
  mmdet and all their dependencies, fetched by ``pip download`` for the target (``--python-version``,
  ``--platform``), following each wheel's requirements (markers evaluated for the target) at the versions
  ``constraints.txt`` pins; pure-Python packages published only as source are built into ``py3-none-any`` wheels
  (torch's wheels are never fetched: pip's resolver would download gigabytes only to read their requirements);
* mmcv's source archive (mmcv 2.1 has no wheel for recent Pythons; it is compiled on the target against its
  torch) and the build requirements its ``setup.py`` needs (``setuptools<81``, ``wheel``, ``ninja``, ``psutil``);
* ``detectron2-0.7.2-py3-none-any.whl``: the pure-Python detectron2 (with ViTDet) repacked by this tool from the
  ``sal-detectron2`` 0.7.2 wheel, whose only binary part, a CPython-3.10 ``_C``, is left out (detectron2 runs
  without it, see ``tools/setup_env.sh``);
* this project's own wheel (``pip wheel --no-deps .``);
* ``manifest.json``: target, files with sizes and sha256, what the target must already have, how to install.

The target environment is expected to provide torch, torchvision, triton and everything they depend on (numpy,
pillow, the nvidia libraries, ...), and OpenCV (``cv2``: mmengine and mmcv import it; ``opencv-python`` alone is
60 MB). ``--provided`` names more packages the target has. The folder must stay under ``--max-mib`` (64 MiB):
the tool prints the total and fails if it is over. With scipy (34 MB, needed by mmseg and mmdet) the folder holds
about 88 MiB, so scipy is left to the target too (``--provided scipy``, as ``make wheelhouse`` does).

  python tools/wheelhouse.py --provided scipy                       # this machine's Python, into wheelhouse/
  python tools/wheelhouse.py --dest wheelhouse-py312 --python-version 3.12 --provided scipy \\
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
  python tools/wheelhouse.py --gpu-node       # the same, for our GPU test node
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from email.parser import Parser
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
# What the target's torch environment brings; their dependency closure is left out of the folder too.
TORCH_ROOTS = ("torch", "torchvision", "triton")
# mmengine and mmcv import cv2; the target's opencv-python(-headless) serves them (60 MB is too much to carry).
DEFAULT_PROVIDED = ("opencv-python",)
# mmcv's setup.py imports pkg_resources (gone from setuptools 81) and torch; ninja and psutil speed up the build.
BUILD_REQUIREMENTS = ("setuptools<81", "wheel", "ninja", "psutil")
# Their wheels require ``opencv-python`` by name, which an ``opencv-python-headless`` target does not satisfy:
# they are installed with --no-deps, their other requirements as ordinary requirements.
NO_DEPS = ("mmengine", "mmcv")
DETECTRON2_SOURCE = ("sal-detectron2", "0.7.2")
# detectron2's pure-Python needs (sal-detectron2's list without its `numpy<2` pin, which detectron2 does not need
# (numpy 2 is tested here), and without `black`, used only to pretty-print configs); fvcore and iopath it imports.
DETECTRON2_REQUIRES = ("Pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8", "tabulate",
                       "cloudpickle", "tqdm>4.29.0", "tensorboard", "omegaconf>=2.1,<2.4", "hydra-core>=1.1",
                       "packaging", "fvcore", "iopath")
# The GPU test node: CPython 3.12 with its own torch, and scipy (34 MB of wheel: without it the folder fits 64 MiB).
GPU_NODE_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
GPU_NODE_PROVIDED = ("scipy",)
MIB = 2 ** 20


class WheelhouseError(RuntimeError):
    """A step failed; the message says which and what to do."""


@dataclass
class Target:
    """The interpreter and platform the wheels are for (pip's ``--python-version/--abi/--platform``)."""

    python_version: str
    platforms: List[str]
    implementation: str = "cp"

    @property
    def abi(self) -> str:
        return self.implementation + self.python_version.replace(".", "")

    def pip_args(self) -> List[str]:
        args = ["--python-version", self.python_version, "--implementation", self.implementation, "--abi", self.abi,
                "--only-binary=:all:"]
        for plat in self.platforms:
            args += ["--platform", plat]
        return args

    def marker_environment(self) -> Dict[str, str]:
        env = default_environment()
        env.update(python_version=self.python_version, python_full_version=self.python_version + ".0",
                   implementation_name="cpython" if self.implementation == "cp" else env["implementation_name"])
        return env


def this_machine_platforms() -> List[str]:
    """This machine's manylinux tags, newest first (what pip would accept here)."""
    from packaging.tags import platform_tags

    tags = [t for t in platform_tags() if t.startswith("manylinux")]
    if not tags:
        raise WheelhouseError(f"no manylinux platform tag for this machine ({platform.platform()}); "
                              "give the target's tags with --platform")
    return tags


def pip(args: Sequence[str], quiet: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run this interpreter's pip; a failure raises with pip's own last lines."""
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"] + (["--quiet"] if quiet else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise WheelhouseError(f"pip failed: {' '.join(cmd[3:])}\n{tail}")
    return proc


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wheel_metadata(path: Path) -> Dict[str, List[str]]:
    """The METADATA headers of a wheel (``Requires-Dist`` and the rest), as lists of values."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(zf.read(name).decode())
    return {k: msg.get_all(k) for k in set(msg.keys())}


def requirements_of(path: Path, extras: Iterable[str], env: Dict[str, str]) -> List[Requirement]:
    """A wheel's requirements that apply to ``env`` with the given extras (markers evaluated)."""
    out = []
    for line in wheel_metadata(path).get("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            req.marker = None
            out.append(req)
    return out


# --------------------------------------------------------------------------------------------- the pieces


def build_own_wheel(staging: Path) -> Path:
    """This project's wheel, built from the working tree (pure Python). setuptools stages it in ``build/`` and
    ``*.egg-info`` inside the tree; whichever of those this build created is removed afterwards (a stale
    ``build/lib`` holds a second copy of every package, which registries then see twice)."""
    leftovers = [ROOT / "build", *ROOT.glob("*.egg-info")]
    existed = {p for p in leftovers if p.exists()}
    try:
        pip(["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(staging), str(ROOT)])
    finally:
        for p in [ROOT / "build", *ROOT.glob("*.egg-info")]:
            if p not in existed and p.is_dir():
                shutil.rmtree(p)
    return _single(staging, "karat-*.whl")


def repack_detectron2(staging: Path, scratch: Path) -> Path:
    """``detectron2-0.7.2-py3-none-any.whl`` from the pure-Python files of the sal-detectron2 wheel.

    The source wheel is tagged for CPython 3.10 only because of its compiled ``_C``; everything else is Python
    and data (model-zoo configs). The new wheel carries those files unchanged, under detectron2's own name.
    """
    name, version = DETECTRON2_SOURCE
    pip(["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10", "--dest", str(scratch),
         f"{name}=={version}"])
    source = _single(scratch, f"{name.replace('-', '_')}-{version}-*.whl")
    out = staging / f"detectron2-{version}-py3-none-any.whl"
    dist_info = f"detectron2-{version}.dist-info"
    metadata = "\n".join(["Metadata-Version: 2.1", "Name: detectron2", f"Version: {version}",
                          f"Summary: detectron2 (pure-Python part of {name} {version}, with ViTDet), "
                          "repacked by KArAt's tools/wheelhouse.py",
                          "Home-page: https://github.com/facebookresearch/detectron2", "License: Apache-2.0",
                          "Requires-Python: >=3.8", *[f"Requires-Dist: {r}" for r in DETECTRON2_REQUIRES]]) + "\n"
    wheel = ("Wheel-Version: 1.0\nGenerator: karat-tools-wheelhouse\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    record: List[List[str]] = []

    def add(zf: zipfile.ZipFile, arcname: str, data: bytes, date_time=(2024, 11, 29, 0, 0, 0)) -> None:
        zf.writestr(zipfile.ZipInfo(arcname, date_time=date_time), data, compress_type=zipfile.ZIP_DEFLATED)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append([arcname, f"sha256={digest}", str(len(data))])

    with zipfile.ZipFile(source) as src, zipfile.ZipFile(out, "w") as zf:
        members = [m for m in src.infolist() if m.filename.startswith("detectron2/") and not m.is_dir()
                   and not os.path.basename(m.filename).startswith("_C")]
        if not any(m.filename == "detectron2/modeling/backbone/vit.py" for m in members):
            raise WheelhouseError(f"{source.name} has no detectron2/modeling/backbone/vit.py (ViTDet)")
        for m in members:
            add(zf, m.filename, src.read(m), m.date_time)
        for fname in ("LICENSE",):
            lic = [n for n in src.namelist() if n.endswith(f".dist-info/{fname}")]
            if lic:
                add(zf, f"{dist_info}/{fname}", src.read(lic[0]))
        add(zf, f"{dist_info}/METADATA", metadata.encode())
        add(zf, f"{dist_info}/WHEEL", wheel.encode())
        add(zf, f"{dist_info}/top_level.txt", b"detectron2\n")
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(record + [[f"{dist_info}/RECORD", "", ""]])
        zf.writestr(zipfile.ZipInfo(f"{dist_info}/RECORD", date_time=(2024, 11, 29, 0, 0, 0)), buf.getvalue(),
                    compress_type=zipfile.ZIP_DEFLATED)
    return out


def download_mmcv_sdist(dest: Path, spec: str) -> tuple[Path, List[Requirement]]:
    """mmcv's source archive and its runtime requirements (read from the archive's requirements/runtime.txt)."""
    pip(["download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "--dest", str(dest), spec])
    sdist = _single(dest, "mmcv-*.tar.gz")
    with tarfile.open(sdist) as tf:
        member = next((m for m in tf.getmembers() if m.name.endswith("requirements/runtime.txt")), None)
        if member is None:
            raise WheelhouseError(f"{sdist.name} has no requirements/runtime.txt")
        lines = tf.extractfile(member).read().decode().splitlines()
    return sdist, [Requirement(ln) for ln in (x.strip() for x in lines) if ln and not ln.startswith("#")]


def pinned(name: str) -> str:
    """``name==version`` from constraints.txt, or the bare name where it is not pinned."""
    found = [str(r) for r in _constraints() if canonicalize_name(r.name) == canonicalize_name(name)]
    return found[0] if found else name


# --------------------------------------------------------------------------------------------- resolution


def installed_closure(roots: Iterable[str], env: Dict[str, str]) -> Set[str]:
    """Canonical names of ``roots`` and everything they require (extras followed), from this environment's
    installed metadata, markers evaluated for the target. Used for torch: its wheels are far too big to fetch
    only to read their requirements."""
    from importlib import metadata

    seen: Set[tuple] = set()
    names: Set[str] = set()
    todo = [(canonicalize_name(r), "") for r in roots]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name == "torch":
                raise WheelhouseError("torch is not installed in this environment; run the tool with the "
                                      "project's environment (make wheelhouse)") from None
            continue
        names.add(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**env, "extra": extra}):
                todo += [(canonicalize_name(req.name), e) for e in ("", *req.extras)]
    return names


class Collector:
    """The dependency closure of some requirements for the target, one wheel per project, pinned by
    constraints.txt where it pins the project (the project's tested set), else the newest wheel pip picks.

    Every generation of new requirements is fetched with one ``pip download --no-deps`` for the target; a
    project published only as source is built here into a wheel, which must be pure Python.
    """

    def __init__(self, target: Target, dest: Path, staging: Path, skip: Set[str], log=print) -> None:
        self.target, self.dest, self.staging, self.skip, self.log = target, dest, staging, skip, log
        self.env = target.marker_environment()
        self.pins = {canonicalize_name(r.name): r for r in _constraints() if r.specifier}
        self.wheels: Dict[str, Path] = {}
        self.extras: Dict[str, Set[str]] = {}
        self.wanted: Dict[str, List[tuple]] = {}  # name -> every (requirement, requester) that asked for it
        self.built: List[str] = []

    def add(self, requirements: Iterable[Requirement], parent: str = "") -> None:
        queue = [(r, parent) for r in requirements]
        while queue:
            fresh: Dict[str, Requirement] = {}
            rescan: List[str] = []
            for req, who in queue:
                if req.marker is not None and not req.marker.evaluate({**self.env, "extra": ""}):
                    continue
                name = canonicalize_name(req.name)
                if name in self.skip:
                    continue
                self.wanted.setdefault(name, []).append((req, who or "the project"))
                new_extras = set(req.extras) - self.extras.setdefault(name, set())
                self.extras[name] |= set(req.extras)
                if name in self.wheels:
                    if new_extras:
                        rescan.append(name)
                elif name not in fresh:
                    fresh[name] = req
            for name, path in self._fetch(fresh).items():
                self.wheels[name] = path
                rescan.append(name)
            queue = [(r, name) for name in dict.fromkeys(rescan)
                     for r in requirements_of(self.wheels[name], self.extras[name], self.env)]

    def _spec(self, name: str, req: Requirement) -> str:
        pin = self.pins.get(name)
        return f"{req.name}{pin.specifier}" if pin is not None else f"{req.name}{req.specifier}"

    def _fetch(self, reqs: Dict[str, Requirement]) -> Dict[str, Path]:
        if not reqs:
            return {}
        specs = {name: self._spec(name, req) for name, req in reqs.items()}
        args = ["download", "--no-deps", "--find-links", str(self.staging), "--dest", str(self.dest),
                *self.target.pip_args()]
        try:
            pip([*args, *specs.values()])
        except WheelhouseError:  # one of them has no wheel for the target: take them one by one
            for name, spec in specs.items():
                try:
                    pip([*args, spec])
                except WheelhouseError as err:
                    self._build_pure(name, spec, err)
                    pip([*args, spec])
        found = {}
        for path in self.dest.glob("*.whl"):
            name = canonicalize_name(parse_wheel_filename(path.name)[0])
            if name in specs:
                found[name] = path
        missing = set(specs) - set(found)
        if missing:
            raise WheelhouseError(f"pip fetched no wheel for {sorted(missing)}")
        return found

    def _build_pure(self, name: str, spec: str, err: Exception) -> None:
        """A wheel from the project's source, for projects that publish no wheel (it must be pure Python)."""
        try:
            pip(["wheel", "--no-deps", "--no-binary", name, "--wheel-dir", str(self.staging), spec])
        except WheelhouseError as build_err:
            raise WheelhouseError(f"{spec} has no wheel for CPython {self.target.python_version} on "
                                  f"{self.target.platforms} and building one failed:\n{err}\n{build_err}") from None
        made = [p for p in self.staging.glob("*.whl") if canonicalize_name(parse_wheel_filename(p.name)[0]) == name]
        if not made or not made[0].name.endswith("-none-any.whl"):
            raise WheelhouseError(f"{spec} is published only as source and is not pure Python "
                                  f"({[p.name for p in made]}); build the wheelhouse on a machine of the target's "
                                  "kind (same Python and platform)")
        self.built.append(made[0].name)

    def check(self) -> None:
        """Every requirement that asked for a project accepts the version that was taken."""
        for name, path in self.wheels.items():
            version = parse_wheel_filename(path.name)[1]
            for req, who in self.wanted.get(name, []):
                if req.specifier and not req.specifier.contains(version, prereleases=True):
                    raise WheelhouseError(f"{path.name} does not satisfy {req} (from {who}); adjust constraints.txt")


def _constraints() -> List[Requirement]:
    lines = (ln.split("#")[0].strip() for ln in CONSTRAINTS.read_text().splitlines())
    return [Requirement(ln) for ln in lines if ln]


# --------------------------------------------------------------------------------------------- the folder


@dataclass
class Manifest:
    target: dict
    created: str
    command: str
    provided: List[str]
    install: dict
    files: List[dict] = field(default_factory=list)
    total_bytes: int = 0
    limit_bytes: int = 0


def write_manifest(folder: Path, manifest: Manifest) -> None:
    manifest.files = [dict(name=p.name, size=p.stat().st_size, sha256=sha256(p))
                      for p in sorted(folder.iterdir()) if p.name != "manifest.json"]
    manifest.total_bytes = sum(f["size"] for f in manifest.files)
    (folder / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1) + "\n")


def size_report(folder: Path, limit: int) -> str:
    files = sorted(folder.iterdir(), key=lambda p: -p.stat().st_size)
    total = sum(p.stat().st_size for p in files)
    lines = [f"{p.stat().st_size / MIB:8.2f} MiB  {p.name}" for p in files[:8]]
    lines.append(f"{total / MIB:8.2f} MiB  total in {len(files)} files (limit {limit / MIB:.0f} MiB)")
    return "\n".join(lines)


def _single(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise WheelhouseError(f"expected one {pattern} in {folder}, found {[p.name for p in found]}")
    return found[0]


def build(dest: Path, target: Target, provided_extra: Sequence[str], limit: int, log=print) -> Manifest:
    """Fill ``dest`` (which must not exist); returns the manifest written into it."""
    t0 = time.time()
    work = dest.with_name(dest.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="karat-wheelhouse-") as tmp:
        scratch, staging = Path(tmp) / "scratch", Path(tmp) / "staging"
        for d in (scratch, staging):
            d.mkdir()
        env = target.marker_environment()
        provided = installed_closure(TORCH_ROOTS, env) | {canonicalize_name(p) for p in provided_extra}
        keep = {canonicalize_name(Requirement(b).name) for b in BUILD_REQUIREMENTS}

        log("[wheelhouse] building karat's wheel, repacking detectron2, fetching mmcv's source")
        own = build_own_wheel(staging)
        d2 = repack_detectron2(staging, scratch)
        mmcv_sdist, mmcv_reqs = download_mmcv_sdist(work, pinned("mmcv"))
        for wheel in (own, d2):
            shutil.copy2(wheel, work)
        own_reqs = requirements_of(own, ("detection", "segmentation"), env)

        log(f"[wheelhouse] collecting wheels for CPython {target.python_version} on {', '.join(target.platforms[:3])}"
            + (" ..." if len(target.platforms) > 3 else ""))
        collector = Collector(target, work, staging, skip=(provided - keep) | {"mmcv"}, log=log)
        collector.add([Requirement(b) for b in BUILD_REQUIREMENTS], "mmcv's build")
        collector.add([r for r in own_reqs], own.name)
        collector.add(requirements_of(d2, (), env), d2.name)
        collector.add(mmcv_reqs, mmcv_sdist.name)
        collector.check()
        if collector.built:
            log(f"[wheelhouse] built pure-Python wheels from source: {', '.join(collector.built)}")

        pins = {name: f"{parse_wheel_filename(p.name)[0]}=={parse_wheel_filename(p.name)[1]}"
                for name, p in collector.wheels.items()}
        deps_of_no_deps = [r for r in mmcv_reqs if canonicalize_name(r.name) not in (*NO_DEPS, *provided)
                           and (r.marker is None or r.marker.evaluate(env))]
        deps_of_no_deps += [r for r in requirements_of(collector.wheels["mmengine"], (), env)
                            if canonicalize_name(r.name) not in provided]
        install = dict(
            build=[pins[canonicalize_name(Requirement(b).name)] for b in BUILD_REQUIREMENTS],
            mmcv_sdist=mmcv_sdist.name,
            no_deps=[pins[n] for n in NO_DEPS if n in pins],
            requirements=sorted({f"karat[detection]=={wheel_metadata(own)['Version'][0]}",
                                 f"detectron2=={DETECTRON2_SOURCE[1]}", pins["mmsegmentation"], pins["mmdet"],
                                 *(str(r) for r in own_reqs if canonicalize_name(r.name) in ("ftfy", "regex")),
                                 *(str(r) for r in deps_of_no_deps)}),
        )
    manifest = Manifest(
        target=dict(asdict(target), abi=target.abi), created=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), provided=sorted(provided - keep),
        install=install, limit_bytes=limit)
    write_manifest(work, manifest)
    log(size_report(work, limit))
    if manifest.total_bytes > limit:
        raise WheelhouseError(
            f"the wheelhouse holds {manifest.total_bytes / MIB:.1f} MiB, over the {limit / MIB:.0f} MiB limit "
            "(largest files above). Name packages the target already has with --provided, or raise --max-mib. "
            f"The folder is left at {work} for inspection.")
    work.rename(dest)
    log(f"[wheelhouse] {len(manifest.files)} files, {manifest.total_bytes / MIB:.1f} MiB, in {dest} "
        f"({time.time() - t0:.0f} s)")
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", type=Path, default=ROOT / "wheelhouse", help="folder to create (default: wheelhouse/)")
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="target CPython, e.g. 3.12 (default: this interpreter's)")
    p.add_argument("--platform", action="append", dest="platforms", metavar="TAG",
                   help="target platform tag, repeatable (default: this machine's manylinux tags)")
    p.add_argument("--provided", nargs="*", default=[], metavar="NAME",
                   help="more packages the target environment already has (left out of the folder)")
    p.add_argument("--gpu-node", action="store_true",
                   help=f"our GPU test node (GPU_NODE in benchmarks/README.md): CPython 3.12 on "
                        f"{', '.join(GPU_NODE_PLATFORMS)}, which also has {', '.join(GPU_NODE_PROVIDED)}")
    p.add_argument("--max-mib", type=float, default=64.0, help="fail when the folder is larger (default: 64)")
    p.add_argument("--replace", action="store_true", help="replace an existing wheelhouse (one with manifest.json)")
    args = p.parse_args(argv)

    if args.gpu_node:
        args.python_version = "3.12"
        args.platforms = args.platforms or list(GPU_NODE_PLATFORMS)
        args.provided = [*args.provided, *GPU_NODE_PROVIDED]
    if args.python_version.count(".") != 1 or not args.python_version.replace(".", "").isdigit():
        p.error(f"--python-version {args.python_version!r}: give major.minor, e.g. 3.12")
    dest = args.dest.resolve()
    if dest.exists():
        if not (args.replace and (dest / "manifest.json").is_file()):
            p.error(f"{dest} exists; remove it, choose another --dest, or pass --replace (only replaces a folder "
                    "this tool made, one with manifest.json)")
        shutil.rmtree(dest)
    target = Target(args.python_version, args.platforms or this_machine_platforms())
    try:
        build(dest, target, [*DEFAULT_PROVIDED, *args.provided], int(args.max_mib * MIB))
    except WheelhouseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
