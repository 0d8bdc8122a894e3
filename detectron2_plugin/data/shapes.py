"""A small, deterministic COCO-format instance-segmentation set: coloured shapes on textured backgrounds.

Every image holds 1-3 objects of three categories (circle, square, triangle), each annotated with a box, a polygon
mask and its area, the way COCO's ``instances_*.json`` files are. The same seed always writes the same files, so
tests and the demo need no download.

Layout (what :func:`detectron2_plugin.data.register_shapes` expects)::

    <root>/annotations/instances_train.json   <root>/train/000000.png ...
    <root>/annotations/instances_val.json     <root>/val/000000.png ...
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

CATEGORIES = ("circle", "square", "triangle")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShapesSpec:
    """How many images of which size: the defaults are what the demo and the tiny config use."""

    num_train: int = 160
    num_val: int = 40
    image_size: int = 32
    min_objects: int = 1
    max_objects: int = 2
    seed: int = 0


def annotation_file(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A background that is not flat: a low-contrast stripe pattern of random direction plus pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, freq = rng.uniform(0, math.pi), rng.uniform(0.3, 1.2)
    stripes = np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    base = rng.uniform(60, 130, size=3)
    img = base[None, None, :] + 18.0 * stripes[..., None] + rng.normal(0, 8, size=(size, size, 3))
    return img


def _polygon(rng: np.random.Generator, category: str, size: int) -> List[Tuple[float, float]]:
    """A shape's outline (x, y) in pixels, fully inside the image."""
    r = rng.uniform(0.2, 0.32) * size
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    if category == "circle":
        n, phase = 16, 0.0
    elif category == "square":
        n, phase = 4, rng.uniform(0, math.pi / 2)
    else:
        n, phase = 3, rng.uniform(0, 2 * math.pi)
    angles = [phase + 2 * math.pi * i / n for i in range(n)]
    return [(float(cx + r * math.cos(a)), float(cy + r * math.sin(a))) for a in angles]


def _bounds(poly: List[Tuple[float, float]]) -> Tuple[float, float, float, float]:
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    return min(xs), min(ys), max(xs), max(ys)


def _overlap(a: Tuple[float, ...], b: Tuple[float, ...], margin: float = 1.0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _render_split(root: Path, split: str, count: int, spec: ShapesSpec, rng: np.random.Generator) -> Dict[str, Any]:
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_util

    images, annotations = [], []
    (root / split).mkdir(parents=True, exist_ok=True)
    size = spec.image_size
    for image_id in range(1, count + 1):
        canvas = _texture(rng, size)
        objects: List[Tuple[int, List[Tuple[float, float]], np.ndarray]] = []
        boxes: List[Tuple[float, float, float, float]] = []
        for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
            for _attempt in range(20):  # objects do not overlap, so each polygon is exactly its visible mask
                cat = int(rng.integers(len(CATEGORIES)))
                poly = _polygon(rng, CATEGORIES[cat], size)
                box = _bounds(poly)
                if not any(_overlap(box, other) for other in boxes):
                    colour = rng.uniform(150, 255, size=3) * rng.permutation([1.0, 0.55, 0.25])
                    objects.append((cat, poly, colour))
                    boxes.append(box)
                    break
        pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _, poly, colour in objects:
            draw.polygon(poly, fill=tuple(int(c) for c in colour))
        file_name = f"{image_id:06d}.png"
        pil.save(root / split / file_name)
        images.append(dict(id=image_id, file_name=file_name, height=size, width=size))
        for (cat, poly, _), (x0, y0, x1, y1) in zip(objects, boxes):
            flat = [round(c, 2) for p in poly for c in p]
            rle = mask_util.frPyObjects([flat], size, size)
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=cat + 1,
                                    bbox=[x0, y0, x1 - x0, y1 - y0], area=float(mask_util.area(rle).sum()),
                                    iscrowd=0, segmentation=[flat]))
    categories = [dict(id=i + 1, name=name, supercategory="shape") for i, name in enumerate(CATEGORIES)]
    return dict(info=dict(description=f"KArAt synthetic shapes ({split})", version="1.0"), licenses=[],
                images=images, annotations=annotations, categories=categories)


def generate_shapes(root: Path, spec: ShapesSpec = ShapesSpec(), overwrite: bool = False) -> Path:
    """Write the dataset under ``root`` (refuses a folder that already holds it unless ``overwrite``)."""
    root = Path(root)
    existing = [annotation_file(root, s) for s in SPLITS if annotation_file(root, s).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass overwrite=True (--overwrite) to regenerate "
                              f"the shapes dataset in {root}.")
    rng = np.random.default_rng(spec.seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in zip(SPLITS, (spec.num_train, spec.num_val)):
        data = _render_split(root, split, count, spec, rng)
        tmp = annotation_file(root, split).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(annotation_file(root, split))
    return root


def ensure_shapes(root: Path, spec: ShapesSpec = ShapesSpec()) -> Path:
    """The dataset under ``root``, generated first if it is not there yet."""
    root = Path(root)
    if not all(annotation_file(root, s).is_file() for s in SPLITS):
        generate_shapes(root, spec, overwrite=False)
    return root
