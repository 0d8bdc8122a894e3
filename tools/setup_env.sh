#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with every framework KArAt plugs into.
#
# Idempotent: each step checks whether its result is already importable and skips itself, and a
# stamp file short-circuits the whole script when nothing it depends on has changed. An interrupted
# run can simply be started again.
#
# Environment variables:
#   VENV          where the environment lives (default: .venv in the repository root)
#   PYTHON        interpreter used to create it (default: python3.11)
#   KARAT_FORCE   set to 1 to re-run every step even when the stamp matches
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
CONSTRAINTS="$ROOT/constraints.txt"
STAMP="$VENV/.karat-env-stamp"
CACHE="${KARAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/karat}"
DETECTRON2_WHEEL_VERSION="0.7.2"

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }

stamp_hash() {
    cat "$ROOT/tools/setup_env.sh" "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1
}

if [[ "${KARAT_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_hash)" && -x "$VENV/bin/python" ]]; then
    log "environment $VENV is up to date"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2; exit 1; }
    log "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check --progress-bar off -c "$CONSTRAINTS")
has() { "$PY" -c "$1" >/dev/null 2>&1; }

# 1. torch + torchvision. The machines' pip config points at a local CPU-only torch wheel that
#    torchvision's wheels cannot load against; an empty find-links folder makes pip take the
#    registry's regular build (CUDA-enabled, runs fine without a GPU).
if has "import torch, torchvision; torchvision.ops.nms"; then
    log "torch $("$PY" -c 'import torch; print(torch.__version__)') already works"
else
    log "installing torch + torchvision (about 2.6 GB of wheels)"
    mkdir -p "$CACHE/empty-find-links"
    PIP_FIND_LINKS="$CACHE/empty-find-links" "${PIP[@]}" torch torchvision
fi

# 2. Build tools mmcv's setup.py needs inside the environment (it imports pkg_resources and torch).
"${PIP[@]}" --quiet "setuptools<81" wheel ninja psutil

# 3. mmcv with its compiled ops (mmseg/mmdet import mmcv.ops). Only the source is on the registry;
#    pip caches the built wheel, so only the first build on a machine takes minutes.
if has "import mmcv, mmcv.ops; from mmcv import _ext"; then
    log "mmcv $("$PY" -c 'import mmcv; print(mmcv.__version__)') with ops already works"
else
    log "building mmcv with ops from source (about 9 minutes on 2 cores the first time)"
    MMCV_WITH_OPS=1 FORCE_CUDA="${FORCE_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "${PIP[@]}" --no-build-isolation mmcv
fi

# 4. The project with every extra (timm, fvcore, einops, mmengine, mmseg, mmdet, detectron2's needs).
log "installing karat (editable) with its extras"
"${PIP[@]}" --no-build-isolation -e "$ROOT[detection,segmentation,demo,dev,export]"

# 5. detectron2: keep an importable one (e.g. built from source by the user); otherwise take the
#    pure-Python package out of the sal-detectron2 0.7.2 wheel (detectron2 with ViTDet), leaving
#    out its CPython-3.10 `_C` extension, which detectron2 does without.
if has "import detectron2.modeling.backbone.vit"; then
    log "detectron2 $("$PY" -c 'import detectron2; print(detectron2.__version__)') already importable"
else
    log "installing pure-Python detectron2 $DETECTRON2_WHEEL_VERSION"
    mkdir -p "$CACHE/wheels"
    "$PY" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.10 \
        -d "$CACHE/wheels" "sal-detectron2==$DETECTRON2_WHEEL_VERSION"
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PY" - "$CACHE/wheels" "$SITE" <<'PYEOF'
import glob, os, sys, zipfile
wheel_dir, site = sys.argv[1], sys.argv[2]
wheel = sorted(glob.glob(os.path.join(wheel_dir, "sal_detectron2-*.whl")))[-1]
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist()
               if m.startswith("detectron2/") and not os.path.basename(m).startswith("_C")]
    zf.extractall(site, members)
print(f"extracted {len(members)} files of {os.path.basename(wheel)} into {site}")
PYEOF
fi

# 6. timm's own test suite (tests/ of timm's sdist) for tests/test_timm_suite.py, which never downloads.
"$PY" -m tools.timm_sdist || log "warning: could not fetch timm's test suite; tests/test_timm_suite.py will say so"

# 7. Final check: everything the product imports.
"$PY" - <<'PYEOF'
import torch, torchvision, timm, einops, fvcore, mmengine, mmcv, mmseg, mmdet, detectron2
from mmcv import _ext  # noqa: F401  compiled ops
import detectron2.modeling.backbone.vit  # noqa: F401  ViTDet
import karat
print(f"torch {torch.__version__} | torchvision {torchvision.__version__} | timm {timm.__version__} | "
      f"mmcv {mmcv.__version__} | mmseg {mmseg.__version__} | mmdet {mmdet.__version__} | "
      f"detectron2 {detectron2.__version__} | karat {karat.__version__}")
PYEOF
stamp_hash > "$STAMP"
log "environment ready: $VENV"
