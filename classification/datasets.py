"""Datasets of the paper's runs, read in their real on-disk formats, with errors that say which layout is expected.

CIFAR-10/100, SVHN, Flowers-102 and STL-10 use torchvision's classes (downloaded with ``--download`` where a
network exists); ImageNet is an ImageFolder tree; ``DIGITS`` is scikit-learn's embedded digits (no download).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from .digits import NUM_CLASSES, load_digits_split

LAYOUTS = {
    "CIFAR10": "<data-path>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (CIFAR-10, python version)",
    "CIFAR100": "<data-path>/cifar-100-python/{train,test,meta} (CIFAR-100, python version)",
    "IMNET": "<data-path>/train/<class>/<image> and <data-path>/val/<class>/<image> (ImageFolder)",
    "SVHN": "<data-path>/{train,test}_32x32.mat",
    "Flowers102": "<data-path>/flowers-102/{jpg/,imagelabels.mat,setid.mat}",
    "STL10": "<data-path>/stl10_binary/{train_X.bin,train_y.bin,test_X.bin,test_y.bin,class_names.txt}",
}


class DatasetLayoutError(FileNotFoundError):
    pass


def _layout_error(name: str, path: str, detail: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"--data-set {name} could not be read from --data-path {path!r}: {detail}. "
                              f"Expected layout: {LAYOUTS[name]}. Pass --download to let torchvision fetch it.")


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
    """``(dataset, num_classes)`` for ``--data-set``; a clear error names the expected layout."""
    name, path = args.data_set, args.data_path
    if name == "DIGITS":  # 8 x 8 grayscale: a one-pixel random shift, not ImageNet's augmentations
        train, val = load_digits_split(seed=args.seed)
        return (train if is_train else val), NUM_CLASSES
    transform = build_transform(is_train, args)
    if not path:
        raise _layout_error(name, path, "no --data-path given")
    if not Path(path).is_dir() and not args.download:
        raise _layout_error(name, path, "the folder does not exist")
    download = bool(args.download)
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
        split = Path(path) / ("train" if is_train else "val")
        if not split.is_dir() or not any(p.is_dir() for p in split.iterdir()):
            raise _layout_error(name, path, f"{split} is missing or has no class folders")
        folder = datasets.ImageFolder(str(split), transform=transform)
        return folder, len(folder.classes)
    except DatasetLayoutError:
        raise
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise _layout_error(name, path, str(e).splitlines()[0] if str(e) else type(e).__name__) from e
