"""A small, deterministic dataset in ADE20K's on-disk layout, and a check of that layout.

``make_embedded_ade20k(root)`` writes ``root/ADEChallengeData2016/images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png`` (label 0 = ignore, 1..150 the ADE20K classes, read with
``reduce_zero_label=True``), so mmseg's own ``ADE20KDataset`` reads it. The scenes are coloured shapes of a few
classes on textured background; a thin ignored frame exercises the ignore label. Same seed, same bytes.

``CheckedADE20KDataset`` (``mmseg_configs.datasets``) is ``ADE20KDataset`` that checks the folder
first, so a wrong ``data_root`` fails with what is missing and how to fix it instead of an empty dataset.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

ROOT_NAME = "ADEChallengeData2016"
SPLITS = ("training", "validation")
# (label in the PNG, RGB colour): the label is ADE20K's 1-based class id (1 wall, 3 sky, 5 tree, 7 road, 13 person).
CLASSES = ((3, (70, 130, 220)), (5, (40, 150, 40)), (7, (120, 120, 120)), (13, (220, 60, 60)))
BACKGROUND = (1, (200, 190, 170))  # wall
# Where the embedded config (upernet_vit-t2-karat_1xb8-60iter_embedded-16x16.py) expects the generated set.
EMBEDDED_ROOT = "data/karat_embedded"


def _scene(rng: np.random.Generator, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    h, w = size
    img = np.empty((h, w, 3), np.float32)
    img[:] = BACKGROUND[1]
    label = np.full((h, w), BACKGROUND[0], np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(rng.integers(2, 5)):
        cls, colour = CLASSES[rng.integers(len(CLASSES))]
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h / 8, h / 3), rng.uniform(w / 8, w / 3)
        if rng.random() < 0.5:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        img[inside] = colour
        label[inside] = cls
    img += rng.normal(0, 12, img.shape)  # texture / sensor noise
    label[0, :] = label[-1, :] = label[:, 0] = label[:, -1] = 0  # ignored frame
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_embedded_ade20k(root: Union[str, Path], num_train: int = 32, num_val: int = 8,
                         size: Tuple[int, int] = (16, 16), seed: int = 0,
                         val_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> Path:
    """Write the dataset under ``root`` (once: an existing complete copy is reused, never overwritten) and
    return its ``data_root`` (``root/ADEChallengeData2016``). ``val_sizes``: validation images take these sizes in
    turn (as ADE20K's own differ from image to image), else ``size``."""
    from PIL import Image

    data_root = Path(root) / ROOT_NAME
    counts = {"training": num_train, "validation": num_val}
    if data_root.exists():
        check_ade20k_layout(data_root)
        found = {s: len(list((data_root / "images" / s).glob("*.jpg"))) for s in SPLITS}
        if found != counts:
            raise FileExistsError(f"{data_root} already holds a dataset with {found} images, not {counts}; "
                                  f"remove it or use another root (nothing is overwritten).")
        return data_root
    rng = np.random.default_rng(seed)
    tmp = data_root.with_name(data_root.name + ".partial")
    for split in SPLITS:
        (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
        (tmp / "annotations" / split).mkdir(parents=True, exist_ok=True)
        prefix = "ADE_train" if split == "training" else "ADE_val"
        for i in range(counts[split]):
            img, label = _scene(rng, val_sizes[i % len(val_sizes)] if val_sizes and split == "validation" else size)
            stem = f"{prefix}_{i:08d}"
            Image.fromarray(img).save(tmp / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(label).save(tmp / "annotations" / split / f"{stem}.png")
    tmp.rename(data_root)  # a half-written dataset never looks complete
    return data_root


def check_ade20k_layout(data_root: Union[str, Path], splits: Tuple[str, ...] = SPLITS) -> None:
    """Raise ``ValueError`` naming what is wrong when ``data_root`` is not in ADE20K's layout."""
    data_root = Path(data_root)
    hint = (f"Expected ADE20K's layout: <data_root>/images/{{training,validation}}/*.jpg and "
            f"<data_root>/annotations/{{training,validation}}/*.png with the same file stems, where data_root is "
            f"the {ROOT_NAME} folder (ADE20K: data/ade/{ROOT_NAME}, see mmseg's dataset preparation docs). "
            f"`python -m mmseg_configs.data {EMBEDDED_ROOT}` writes a small generated set with data_root "
            f"{EMBEDDED_ROOT}/{ROOT_NAME}, where the embedded config looks.")
    if not data_root.is_dir():
        raise ValueError(f"ADE20K data_root {data_root} does not exist. {hint}")
    for split in splits:
        images, annotations = data_root / "images" / split, data_root / "annotations" / split
        for folder in (images, annotations):
            if not folder.is_dir():
                raise ValueError(f"ADE20K data_root {data_root} has no {folder.relative_to(data_root)} folder. {hint}")
        jpgs = {p.stem for p in images.glob("*.jpg")}
        pngs = {p.stem for p in annotations.glob("*.png")}
        if not jpgs:
            raise ValueError(f"{images} holds no .jpg images. {hint}")
        lacking = sorted(jpgs - pngs)
        if lacking:
            raise ValueError(f"{len(lacking)} images in {images} have no label .png in {annotations} "
                             f"(e.g. {lacking[0]}). {hint}")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m mmseg_configs.data ROOT``: write the generated set and print its data_root."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m mmseg_configs.data",
        description="Write a small generated dataset in ADE20K's layout (ROOT/ADEChallengeData2016/images|"
                    "annotations/training|validation) that mmseg's ADE20KDataset reads. The embedded config "
                    f"reads it from {EMBEDDED_ROOT}/{ROOT_NAME}: run `python -m mmseg_configs.data {EMBEDDED_ROOT}`.")
    p.add_argument("root", help=f"folder to write {ROOT_NAME}/ into (the embedded config's: {EMBEDDED_ROOT})")
    p.add_argument("num_train", type=int, nargs="?", default=32, help="training images (default 32)")
    p.add_argument("num_val", type=int, nargs="?", default=8, help="validation images (default 8)")
    p.add_argument("--size", type=int, nargs=2, default=(16, 16), metavar=("H", "W"), help="image size (16 16)")
    p.add_argument("--val-sizes", type=int, nargs="+", default=None, metavar="H W",
                   help="validation image sizes in turn, as H W pairs (e.g. 20 28 24 16): images of several sizes")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.val_sizes and len(a.val_sizes) % 2:
        p.error("--val-sizes takes H W pairs")
    if a.num_train < 1 or a.num_val < 1:
        p.error("num_train and num_val must be at least 1")
    try:
        val_sizes = list(zip(a.val_sizes[::2], a.val_sizes[1::2])) if a.val_sizes else None
        print(make_embedded_ade20k(a.root, a.num_train, a.num_val, size=tuple(a.size), seed=a.seed,
                                   val_sizes=val_sizes))
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
