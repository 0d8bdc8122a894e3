#!/usr/bin/env bash
# Install KArAt and the frameworks it plugs into from a wheelhouse (tools/wheelhouse.py), with no network, into
# an EXISTING Python environment that already has torch, torchvision and OpenCV (cv2): an air-gapped cluster's
# environment, or our GPU test node's.
#
#   bash tools/install_offline.sh DIR
#
# Steps: check the folder against its manifest.json (sha256 of every file) and the interpreter against its target;
# install mmcv's build tools; install everything but mmcv with `pip install --no-index --find-links DIR` (what the
# environment already has at a suitable version is kept); install mmcv (a prebuilt mmcv wheel in DIR that loads
# with this torch, else compiled here from the source archive in DIR); import karat, detectron2's ViTDet, mmseg
# and mmdet to prove it.
#
# Environment variables:
#   PYTHON         interpreter of the target environment (default: python3, then python, on PATH)
#   MAX_JOBS       parallel compile jobs for mmcv (default: the number of CPUs)
#   MMCV_WITH_OPS  1 (default) compiles mmcv's C++ ops: mmseg.models and mmdet.models import mmcv.ops
#   FORCE_CUDA     1 also compiles mmcv's CUDA ops (much slower; UperNet, ViTDet and KArAt need none); default 0
#   MMCV_WHEEL_OUT folder that keeps the mmcv wheel compiled here (default: a temporary folder)
#   KEEP_INSTALLED 1 keeps the environment's own version of a package the folder carries wherever it satisfies the
#                  requirements; by default the folder's (tested) versions are installed
set -euo pipefail

die() { printf '\033[1;31m[install_offline] error:\033[0m %s\n' "$*" >&2; exit 1; }
log() { printf '\033[1;34m[install_offline]\033[0m %s\n' "$*"; }

[[ $# -eq 1 ]] || die "usage: bash tools/install_offline.sh WHEELHOUSE_DIR (a folder made by tools/wheelhouse.py)"
DIR="$(cd "$1" 2>/dev/null && pwd)" || die "wheelhouse folder $1 does not exist"
[[ -f "$DIR/manifest.json" ]] || die "$DIR has no manifest.json; build the folder with tools/wheelhouse.py"
PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
[[ -n "$PY" ]] && "$PY" -c "" 2>/dev/null || die "no Python interpreter; set PYTHON=/path/to/env/bin/python"
"$PY" -c "import torch" 2>/dev/null \
    || die "$PY cannot import torch; this installs into an existing torch environment (set PYTHON to its python)"
T0=$SECONDS

# 1. The folder and the interpreter: every listed file present and intact, the Python the folder was made for.
"$PY" - "$DIR" <<'PYEOF' || exit 1
import hashlib, json, sys
from pathlib import Path
folder = Path(sys.argv[1])
m = json.loads((folder / "manifest.json").read_text())
want, have = m["target"]["python_version"], "%d.%d" % sys.version_info[:2]
if want != have:
    sys.exit(f"[install_offline] error: {folder} holds wheels for Python {want}, this interpreter is {have}; "
             f"build one with: python tools/wheelhouse.py --python-version {have} ...")
for f in m["files"]:
    p = folder / f["name"]
    if not p.is_file():
        sys.exit(f"[install_offline] error: {f['name']} is missing from {folder}; copy the whole folder")
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != f["sha256"]:
        sys.exit(f"[install_offline] error: {f['name']} in {folder} is damaged (sha256 differs from manifest.json)")
print(f"[install_offline] {len(m['files'])} files verified, made for CPython {want} ({m['created']})")
PYEOF
field() {  # one entry of the manifest's "install" record, one value a line
    "$PY" -c 'import json, sys; v = json.load(open(sys.argv[1]))["install"][sys.argv[2]]
print("\n".join(v) if isinstance(v, list) else v)' "$DIR/manifest.json" "$1"
}
mapfile -t BUILD < <(field build)
mapfile -t NO_DEPS < <(field no_deps)
mapfile -t REQUIREMENTS < <(field requirements)
MMCV_SDIST="$(field mmcv_sdist)"
MMCV_VERSION="${MMCV_SDIST#mmcv-}"; MMCV_VERSION="${MMCV_VERSION%.tar.gz}"

"$PY" -c "import cv2" 2>/dev/null || die "$PY cannot import cv2 (mmengine and mmcv need it; the wheelhouse leaves \
OpenCV to the environment): install opencv-python-headless there, or carry its wheel in $DIR and pip install it"

PIP=("$PY" -m pip install --no-index --find-links "$DIR" --disable-pip-version-check --progress-bar off)
if [[ "${KEEP_INSTALLED:-0}" != 1 ]]; then  # the tested versions of everything the folder carries
    PINS="$(mktemp)"
    "$PY" -c 'import json, sys; from pathlib import Path
for f in json.load(open(sys.argv[1]))["files"]:
    if f["name"].endswith(".whl"):
        name, version = f["name"].split("-")[:2]
        print(f"{name}=={version}")' "$DIR/manifest.json" > "$PINS"
    PIP+=(-c "$PINS")
fi

# 2. mmcv's build tools (its setup.py imports pkg_resources, gone from setuptools 81, and torch).
log "build tools: ${BUILD[*]}"
"${PIP[@]}" --quiet "${BUILD[@]}"

# 3. mmengine (and anything else installed without its requirements: their wheels ask for `opencv-python` by
#    name, which an environment with opencv-python-headless does not satisfy; cv2 was checked above).
log "without requirements: ${NO_DEPS[*]}"
"${PIP[@]}" --quiet --no-deps "${NO_DEPS[@]}"

# 4. Everything else but mmcv (nothing there requires it); what the environment already has at a suitable version
#    stays as it is.
log "installing: ${REQUIREMENTS[*]}"
"${PIP[@]}" --quiet "${REQUIREMENTS[@]}"

# 5. mmcv with its compiled ops (importing it needs mmengine and its requirements, installed above): already
#    here, or a prebuilt wheel in the folder that loads with this torch, or compiled from the source archive.
mmcv_ok() {
    "$PY" -c "import mmcv, sys; from mmcv import _ext; sys.exit(mmcv.__version__ != '$MMCV_VERSION')" 2>/dev/null
}
if mmcv_ok; then
    log "mmcv $MMCV_VERSION with its ops is already installed"
else
    for wheel in "$DIR"/mmcv-"$MMCV_VERSION"-*.whl; do
        [[ -f "$wheel" ]] || continue
        if "${PIP[@]}" --quiet --no-deps --force-reinstall "$wheel" && mmcv_ok; then
            log "mmcv from the prebuilt $(basename "$wheel")"
            break
        fi
        why="$("$PY" -c "from mmcv import _ext" 2>&1 | tail -1)"
        log "$(basename "$wheel") does not fit this Python or torch ($why); compiling mmcv instead"
    done
    if ! mmcv_ok; then
        export MMCV_WITH_OPS="${MMCV_WITH_OPS:-1}" FORCE_CUDA="${FORCE_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
        log "compiling mmcv $MMCV_VERSION (MMCV_WITH_OPS=$MMCV_WITH_OPS FORCE_CUDA=$FORCE_CUDA MAX_JOBS=$MAX_JOBS)"
        t=$SECONDS
        WHEELS="${MMCV_WHEEL_OUT:-$(mktemp -d)}"
        mkdir -p "$WHEELS"
        "$PY" -m pip wheel --no-index --find-links "$DIR" --disable-pip-version-check --progress-bar off --quiet \
            --no-build-isolation --no-deps --wheel-dir "$WHEELS" "$DIR/$MMCV_SDIST"
        "${PIP[@]}" --quiet --no-deps --force-reinstall "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl
        mmcv_ok || die "mmcv $MMCV_VERSION was built but 'from mmcv import _ext' fails"
        log "mmcv compiled in $((SECONDS - t)) s; its wheel is in $WHEELS (put it into $DIR to skip the next build)"
    fi
fi

# 6. Consistency (pip check), where only the opencv-python name may be missing (cv2 imports, checked above).
if ! problems="$("$PY" -m pip check --disable-pip-version-check 2>&1)"; then
    rest="$(grep -vi "opencv-python" <<<"$problems" || true)"
    [[ -z "$rest" ]] || log "pip check reports (pre-existing or unrelated to this folder?):"$'\n'"$rest"
fi

# 7. Proof: the frameworks import and KArAt plugs into each, from outside any source checkout.
cd "$(mktemp -d)"
"$PY" - <<'PYEOF'
import torch, timm, mmcv, mmengine, mmseg, mmdet, detectron2
from mmcv import _ext  # noqa: F401  compiled ops
import mmseg.models, mmdet.models  # noqa: F401  (they import mmcv.ops)
from detectron2.modeling.backbone.vit import ViT  # noqa: F401  ViTDet
import karat
from detectron2_plugin import KArAtViT  # noqa: F401
import mmseg_configs.backbones  # noqa: F401  KArAt backbones in mmseg's and mmdet's registries

model = timm.create_model("vit_tiny_patch16_224_karat", img_size=32, patch_size=8, num_classes=3)
assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
print(f"[install_offline] ok: torch {torch.__version__} | timm {timm.__version__} | mmcv {mmcv.__version__} | "
      f"mmengine {mmengine.__version__} | mmseg {mmseg.__version__} | mmdet {mmdet.__version__} | "
      f"detectron2 {detectron2.__version__} | karat {karat.__version__} from {karat.__file__}")
PYEOF
log "done in $((SECONDS - T0)) s"
