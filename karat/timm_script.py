"""Run one of timm's own scripts with the KArAt models registered: ``python -m karat.timm_script SCRIPT.py ARGS...``.

timm's ``train.py`` imports a package before building the model with ``--device-modules karat``; ``validate.py``,
``benchmark.py``, ``onnx_export.py`` and ``onnx_validate.py`` have no such flag, so ``timm.create_model`` would not
know ``vit_tiny_patch16_224_karat``. This imports :mod:`karat` (which registers every KArAt model with timm) and then
runs the script as ``python SCRIPT.py ARGS...`` would: as ``__main__``, with ``sys.argv`` set to the script's (timm's
scripts import the installed timm only, so ``sys.path`` is left alone). The scripts come from timm's repository
(https://github.com/huggingface/pytorch-image-models).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import List, Optional

USAGE = "usage: python -m karat.timm_script SCRIPT.py [ARGS...]  (a script from timm's repository, e.g. validate.py)"


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    script = Path(argv[0])
    if not script.is_file():
        raise SystemExit(f"karat.timm_script: no script at {script}. Give the path of one of timm's scripts "
                         f"(train.py, validate.py, benchmark.py, onnx_export.py, onnx_validate.py) from a checkout of "
                         f"https://github.com/huggingface/pytorch-image-models.\n{USAGE}")
    import karat  # noqa: F401  registers the KArAt models with timm before the script builds one

    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
