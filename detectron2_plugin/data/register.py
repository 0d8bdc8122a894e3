"""The shapes set as detectron2 datasets ``karat_shapes_train`` / ``karat_shapes_val`` (COCO instances).

Registered on import of :mod:`detectron2_plugin`, like detectron2's builtin datasets: the root is
``$KARAT_SHAPES_ROOT``, default ``$DETECTRON2_DATASETS/karat_shapes`` (``datasets/karat_shapes``). The files are
read only when a data loader asks for them, so a missing or wrong folder fails there with a message saying how to
make it: ``python -m detectron2_plugin.data --output <root>``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes import CATEGORIES, SPLITS, annotation_file

DATASET_PREFIX = "karat_shapes"


def default_root() -> Path:
    env = os.getenv("KARAT_SHAPES_ROOT")
    if env:
        return Path(env).expanduser()
    return Path(os.getenv("DETECTRON2_DATASETS", "datasets")).expanduser() / "karat_shapes"


def check_root(root: Path, split: str) -> None:
    """Raise a clear error when ``root`` does not hold the ``split`` of the shapes set."""
    json_file, image_root = annotation_file(root, split), Path(root) / split
    if not json_file.is_file() or not image_root.is_dir():
        missing = json_file if not json_file.is_file() else image_root
        raise FileNotFoundError(
            f"The KArAt shapes dataset is not at {Path(root).resolve()}: {missing} is missing. Generate it with "
            f"`python -m detectron2_plugin.data --output {root}`, or point KARAT_SHAPES_ROOT at the folder that "
            f"holds annotations/instances_{{train,val}}.json and the train/ and val/ image folders.")


def _loader(root: Path, split: str, name: str):
    def load() -> List[Dict]:
        check_root(root, split)
        return load_coco_json(str(annotation_file(root, split)), str(Path(root) / split), name)

    return load


def register_shapes(root: Optional[Path] = None, prefix: str = DATASET_PREFIX) -> Dict[str, str]:
    """Register ``<prefix>_train`` and ``<prefix>_val`` for the set under ``root`` (replacing earlier ones
    of the same names). Returns split -> dataset name."""
    root = Path(root) if root is not None else default_root()
    names = {}
    for split in SPLITS:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        # What register_coco_instances does, with a loader that checks the folder first.
        DatasetCatalog.register(name, _loader(root, split, name))
        MetadataCatalog.get(name).set(json_file=str(annotation_file(root, split)), image_root=str(Path(root) / split),
                                      evaluator_type="coco", thing_classes=list(CATEGORIES))
        names[split] = name
    return names
