"""detectron2's ``DetectionCheckpointer``, loading weights only unless pickles are explicitly allowed.

detectron2 reads ``.pkl`` (Detectron/Caffe2 model-zoo) and ``.pyth`` (pycls) checkpoints with ``pickle``, which
runs whatever code the file names. Here they load only with ``allow_pickle=True`` (``--allow-pickle`` on
``tools/lazyconfig_train.py``), for files from a source you trust; everything else (``.pth``, ``.safetensors``)
goes through :func:`karat.load_checkpoint`: tensors and plain values only, and a damaged file is reported as
corrupt or truncated.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

from detectron2.checkpoint import DetectionCheckpointer

from karat.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".pkl", ".pyth")


class PickleNotAllowedError(ValueError):
    """A pickled checkpoint (code may run on load) was given without ``--allow-pickle``."""


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with weights-only loading; ``allow_pickle`` opts into ``.pkl``/``.pyth``."""

    def __init__(self, model: Any, save_dir: str = "", *, allow_pickle: bool = False, **checkpointables: Any) -> None:
        super().__init__(model, save_dir, **checkpointables)
        self.allow_pickle = allow_pickle

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(PICKLE_SUFFIXES):
            if not self.allow_pickle:
                raise PickleNotAllowedError(
                    f"{filename} is a pickled checkpoint: loading it runs any code it names. Convert it to a .pth of "
                    f"tensors, or, for a file from a source you trust, pass --allow-pickle to "
                    f"tools/lazyconfig_train.py (allow_pickle=True in code).")
            logger.warning("Unpickling %s (--allow-pickle): it may run code; use only files you trust.", filename)
            return super()._load_file(filename)
        loaded = load_checkpoint(self.path_manager.get_local_path(filename))
        if "model" not in loaded:  # a bare state dict, as DetectionCheckpointer takes it
            loaded = {"model": loaded}
        loaded["matching_heuristics"] = True
        return loaded
