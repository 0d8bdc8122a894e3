"""``CheckedADE20KDataset``, registered in mmseg's ``DATASETS``: mmseg's ``ADE20KDataset`` that checks the
ADE20K folder layout first (``data.check_ade20k_layout``), so a wrong ``data_root`` fails with what is missing.

Registration lives here, apart from the generator in ``data.py``, and reads ``data`` only when a dataset is
built: the package's ``__init__`` imports this module, and ``python -m mmseg_configs.data`` must find ``data``
not yet imported (runpy warns otherwise).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from mmseg.datasets import ADE20KDataset
from mmseg.registry import DATASETS


@DATASETS.register_module()
class CheckedADE20KDataset(ADE20KDataset):
    """mmseg's ``ADE20KDataset`` that checks the ADE20K folder layout before reading it."""

    def __init__(self, data_root: Optional[str] = None, data_prefix: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> None:
        prefix = dict(data_prefix or {})
        img = Path(str(prefix.get("img_path", "images/training")))
        split = img.name if img.parent.name == "images" else None
        if data_root is not None and split is not None:
            from .data import check_ade20k_layout  # not at load time: see the module docstring

            check_ade20k_layout(data_root, splits=(split,))
        super().__init__(data_root=data_root, data_prefix=prefix or dict(img_path="", seg_map_path=""), **kwargs)
