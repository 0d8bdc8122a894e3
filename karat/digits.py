"""The embedded default dataset: scikit-learn's real 8x8 handwritten digits (1,797 images, no download).

It lives in the core because the classification entry point, the demo and `karat.analysis` all use it."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

NUM_CLASSES = 10
IMG_SIZE = 8
MEAN, STD = 0.3, 0.38  # of the pixel values scaled to [0, 1]


def load_digits_split(val_fraction: float = 0.2, seed: int = 0) -> Tuple["DigitsDataset", "DigitsDataset"]:
    """A stratified, seeded train / held-out split of the digits images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0 - MEAN) / STD
    x_tr, x_va, y_tr, y_va = train_test_split(images, data.target, test_size=val_fraction,
                                              stratify=data.target, random_state=seed)
    return DigitsDataset(x_tr, y_tr, augment=True), DigitsDataset(x_va, y_va, augment=False)


class DigitsDataset(Dataset):
    """``(1, 8, 8)`` float images; training samples are shifted by up to one pixel (a light augmentation)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, augment: bool) -> None:
        self.images = torch.from_numpy(images).unsqueeze(1)
        self.targets = torch.from_numpy(targets).long()
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]
        if self.augment:
            padded = torch.nn.functional.pad(img, (1, 1, 1, 1), value=-MEAN / STD)
            dy, dx = torch.randint(0, 3, (2,)).tolist()
            img = padded[:, dy:dy + IMG_SIZE, dx:dx + IMG_SIZE]
        return img, self.targets[i]
