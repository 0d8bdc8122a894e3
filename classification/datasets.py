"""Datasets of the paper's runs, read in their real on-disk formats, with errors that say which layout is expected.

CIFAR-10/100, SVHN, Flowers-102 and STL-10 use torchvision's classes (downloaded with ``--download`` where a
network exists); ImageNet is an ImageFolder tree (``train/`` and ``val/`` or ``validation/``, with the same class
folders); ``DIGITS`` is scikit-learn's embedded digits (no download).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Optional, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from karat.digits import NUM_CLASSES, load_digits_split

LAYOUTS = {
    "CIFAR10": "<data-path>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (CIFAR-10, python version)",
    "CIFAR100": "<data-path>/cifar-100-python/{train,test,meta} (CIFAR-100, python version)",
    "IMNET": "<data-path>/train/<class>/<image> and <data-path>/val/<class>/<image> or "
             "<data-path>/validation/<class>/<image> (ImageFolder; the same class folders in both)",
    "SVHN": "<data-path>/{train,test}_32x32.mat",
    "Flowers102": "<data-path>/flowers-102/{jpg/,imagelabels.mat,setid.mat}",
    "STL10": "<data-path>/stl10_binary/{train_X.bin,train_y.bin,test_X.bin,test_y.bin,class_names.txt}",
}


# Where the validation images of an ImageNet-layout tree may live: DeiT's `val/`, or `validation/`.
IMNET_VAL_DIRS = ("val", "validation")


class DatasetLayoutError(FileNotFoundError):
    pass


class DatasetTooSmallError(ValueError):
    """The training set cannot fill one batch, so an epoch would take no step."""


def _fetch_hint(name: str, download: bool) -> str:
    """What to do about missing files: only torchvision's datasets can be downloaded, and only without a
    ``--download`` that already failed."""
    if name == "IMNET":
        return ("ImageNet cannot be downloaded automatically (--download does not apply to it): get ILSVRC-2012 "
                "from image-net.org and arrange it as above.")
    if download:
        return "--download was given, but torchvision could not fetch it (no network?): place the files there yourself."
    return "Pass --download to let torchvision fetch it."


def _layout_error(name: str, path: str, detail: str, download: bool = False) -> DatasetLayoutError:
    return DatasetLayoutError(f"--data-set {name} could not be read from --data-path {path!r}: {detail}. "
                              f"Expected layout: {LAYOUTS[name]}. {_fetch_hint(name, download)}")


def _class_dirs(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def imagenet_split_dir(path: str, is_train: bool) -> Path:
    """``<path>/train``, or the first of ``<path>/val`` and ``<path>/validation`` that holds class folders."""
    root = Path(path)
    if is_train:
        split = root / "train"
        if not _class_dirs(split):
            raise _layout_error("IMNET", path, f"{split} is missing or has no class folders")
        return split
    for name in IMNET_VAL_DIRS:
        if _class_dirs(root / name):
            return root / name
    searched = " or ".join(str(root / name) for name in IMNET_VAL_DIRS)
    raise _layout_error("IMNET", path, f"no validation split: neither {searched} exists with class folders "
                                       f"(searched in {root})")


def check_same_classes(train_dir: Path, val_dir: Path) -> List[str]:
    """The class folders of both splits, which must be the same: ImageFolder numbers classes by sorted folder name
    per split, so a class missing from one side would shift every later label of the other."""
    train, val = _class_dirs(train_dir), _class_dirs(val_dir)
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise DatasetLayoutError(
            f"--data-set IMNET: the class folders of {train_dir} and {val_dir} differ (only in {train_dir.name}/: "
            f"{_names(only_train)}; only in {val_dir.name}/: {_names(only_val)}). Labels are numbered by sorted "
            f"class folder, so every class must exist in both splits: add the missing class folders or remove the "
            f"extra ones.")
    return train


def _names(items: List[str], limit: int = 10) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_fills_a_batch(dataset: Dataset, args: argparse.Namespace, world_size: Optional[int] = None) -> None:
    """Training drops the last incomplete batch, so each process needs at least one full batch of images."""
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    n = len(dataset)
    if getattr(args, "train_subset", 0):
        n = min(n, args.train_subset)
    if n // world < args.batch_size:
        per_rank = f" ({n // world} per process with {world} processes)" if world > 1 else ""
        raise DatasetTooSmallError(
            f"--data-set {args.data_set}: the training set has {n} images{per_rank}, fewer than one batch of "
            f"--batch-size {args.batch_size}; incomplete batches are dropped, so an epoch would take no step. "
            f"Lower --batch-size to at most {max(1, n // world)} or add training images.")


class _LocalCIFAR:
    """torchvision's CIFAR readers without the md5 checks (local copies, re-packed files, tests)."""

    def _check_integrity(self) -> bool:
        root = Path(self.root) / self.base_folder
        return all((root / name).is_file() for name, _ in self.train_list + self.test_list + [(self.meta["filename"], "")])

    def _load_meta(self) -> None:
        import pickle

        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _LocalCIFAR10(_LocalCIFAR, datasets.CIFAR10):
    pass


class _LocalCIFAR100(_LocalCIFAR, datasets.CIFAR100):
    pass


def build_transform(is_train: bool, args: argparse.Namespace):
    """DeiT's transforms from timm's factory; small inputs (<= 32 px) get a padded random crop instead."""
    size = args.input_size
    if is_train:
        t = create_transform(input_size=size, is_training=True, color_jitter=args.color_jitter,
                             auto_augment=args.aa or None, interpolation=args.train_interpolation,
                             re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
        if size <= 32:
            t.transforms[0] = transforms.RandomCrop(size, padding=4)
        return t
    return create_transform(input_size=size, is_training=False, interpolation="bicubic",
                            crop_pct=1.0 if size <= 32 else 0.875, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def build_dataset(is_train: bool, args: argparse.Namespace) -> Tuple[Dataset, int]:
    """``(dataset, num_classes)`` for ``--data-set``; a clear error names the expected layout, and a training set
    that cannot fill one batch is refused (unless only evaluating)."""
    dataset, num_classes = _build(is_train, args)
    if is_train and not getattr(args, "eval", False):
        check_fills_a_batch(dataset, args)
    return dataset, num_classes


def _build(is_train: bool, args: argparse.Namespace) -> Tuple[Dataset, int]:
    name, path = args.data_set, args.data_path
    if name == "DIGITS":  # 8 x 8 grayscale: a one-pixel random shift, not ImageNet's augmentations
        train, val = load_digits_split(seed=args.seed)
        return (train if is_train else val), NUM_CLASSES
    transform = build_transform(is_train, args)
    download = bool(getattr(args, "download", False))
    if not path:
        raise _layout_error(name, path, "no --data-path given", download)
    if not Path(path).is_dir() and (name == "IMNET" or not download):
        raise _layout_error(name, path, "the folder does not exist", download)
    try:
        if name == "CIFAR10":
            return _LocalCIFAR10(path, train=is_train, transform=transform, download=download), 10
        if name == "CIFAR100":
            return _LocalCIFAR100(path, train=is_train, transform=transform, download=download), 100
        if name == "SVHN":
            return datasets.SVHN(path, split="train" if is_train else "test", transform=transform, download=download), 10
        if name == "Flowers102":
            return datasets.Flowers102(path, split="train" if is_train else "test", transform=transform,
                                       download=download), 102
        if name == "STL10":
            return datasets.STL10(path, split="train" if is_train else "test", transform=transform, download=download), 10
        train_dir, val_dir = imagenet_split_dir(path, True), imagenet_split_dir(path, False)
        classes = check_same_classes(train_dir, val_dir)
        # an empty validation class folder still numbers the classes after it correctly
        folder = datasets.ImageFolder(str(train_dir if is_train else val_dir), transform=transform,
                                      allow_empty=not is_train)
        return folder, len(classes)
    except DatasetLayoutError:
        raise
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise _layout_error(name, path, str(e).splitlines()[0] if str(e) else type(e).__name__, download) from e
