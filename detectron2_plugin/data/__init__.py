"""Embedded detection data: the synthetic COCO-format shapes set and its detectron2 registration."""
from .register import DATASET_PREFIX, check_root, default_root, register_shapes
from .shapes import CATEGORIES, ShapesSpec, annotation_file, ensure_shapes, generate_shapes

__all__ = ["CATEGORIES", "DATASET_PREFIX", "ShapesSpec", "annotation_file", "check_root", "default_root",
           "ensure_shapes", "generate_shapes", "register_shapes"]
