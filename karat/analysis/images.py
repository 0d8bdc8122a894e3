"""The images an analysis runs on: a folder (flat, or one subfolder per class as torchvision's ImageFolder, which
then also gives labels), resized and normalised the way the checkpoint's model expects."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageSet:
    """Normalised images ``(M, C, H, W)``, their labels if known, and where they came from."""

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    source: str
    classes: List[str] = field(default_factory=list)

    def batches(self, batch_size: int, count: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The first ``count`` batches (a fixed, held-out set for loss landscapes); needs labels."""
        if self.labels is None:
            raise ValueError("These images have no labels.")
        n = min(len(self.labels), batch_size * count)
        return [(self.images[i:i + batch_size], self.labels[i:i + batch_size]) for i in range(0, n, batch_size)]


def _read(path: Path) -> np.ndarray:
    from PIL import Image  # matplotlib's own image dependency

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def load_image_folder(folder: str, size: Tuple[int, int], in_chans: int, mean: Sequence[float],
                      std: Sequence[float], limit: int = 256) -> ImageSet:
    """Up to ``limit`` images of ``folder`` as the model's input: RGB (or its mean for one channel), bilinearly
    resized to ``size``, normalised with ``mean`` / ``std``. Subfolders are classes (sorted names -> 0, 1, ...)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {folder} is not a folder. Give a folder of images (optionally one "
                                f"subfolder per class, as torchvision's ImageFolder).")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files: List[Tuple[Path, Optional[int]]] = []
    if classes:
        per_class = [[(p, i) for p in sorted((root / c).iterdir()) if p.suffix.lower() in EXTENSIONS]
                     for i, c in enumerate(classes)]
        # round robin over the classes, so that the first images (attention figure, landscape batches) cover all
        files = [f for group in zip_longest(*per_class) for f in group if f is not None]
    else:
        files = [(p, None) for p in sorted(root.iterdir()) if p.suffix.lower() in EXTENSIONS]
    if not files:
        raise ValueError(f"--images {folder} holds no images ({', '.join(EXTENSIONS)}).")
    files = files[:limit]
    batch = []
    for p, _ in files:
        x = torch.from_numpy(_read(p)).permute(2, 0, 1).unsqueeze(0)
        batch.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0])
    images = torch.stack(batch)
    if in_chans == 1:
        images = images.mean(1, keepdim=True)
    elif in_chans != 3:
        raise ValueError(f"The model takes {in_chans} input channels; image folders give 1 (grayscale) or 3 (RGB).")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    labels = torch.tensor([lab for _, lab in files]) if classes else None
    return ImageSet((images - m) / s, labels, str(root), classes)
