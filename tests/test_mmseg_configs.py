"""The OpenMMLab configs inherit instead of copying, and resolve to what they said before: the 80k schedule
(``_base_/schedules/warmup_poly_80k.py``) and the KArAt options (``_base_/models/karat.py``) are written once."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import require

REPO = Path(__file__).resolve().parents[1]
MMSEG = REPO / "mmseg_configs"
UPERNET = sorted((MMSEG / "upernet").glob("*.py"))
MMDET = MMSEG / "mmdet" / "mask-rcnn_vit-b16-karat_sfp_8xb2-1x_coco-1024x1024.py"
PAPER = dict(basis_type="FourierBasis", hidden_dim=12, modular_attn=True, modular_mode="phi1_w2", blockwise=True,
             base_fn="ZeroModule")


def _load(path: Path):
    require("mmseg")
    from mmengine.config import Config

    return Config.fromfile(str(path), import_custom_modules=False)


@pytest.mark.slow
@pytest.mark.parametrize("path", UPERNET + [MMDET], ids=[p.name for p in UPERNET + [MMDET]])
def test_config_resolves_to_its_settings(path: Path) -> None:
    cfg = _load(path)
    assert cfg.custom_imports.imports == ["mmseg_configs"]
    backbone = cfg.model.backbone
    if "karat" in path.name:
        assert backbone.type == ("KArAtSwinTransformer" if "swin" in path.name else "KArAtVisionTransformer")
        grid = 1 if "b16" in path.name else 3
        assert {k: backbone[k] for k in [*PAPER, "grid"]} == dict(PAPER, grid=grid)
    else:
        assert not any(k in backbone for k in PAPER)
    if "80k" in path.name:  # the 160k config on the 80k schedule, nothing else changed
        base = _load(Path(str(path).replace("80k", "160k")))
        assert cfg.model == base.model and cfg.optim_wrapper == base.optim_wrapper
        assert cfg.train_dataloader == base.train_dataloader
        assert [(s.type, s.begin, s.end) for s in cfg.param_scheduler] == [("LinearLR", 0, 1500),
                                                                            ("PolyLR", 1500, 80000)]
        assert (cfg.train_cfg.max_iters, cfg.train_cfg.val_interval) == (80000, 8000)
        assert cfg.default_hooks.checkpoint.interval == 8000
        assert cfg.default_hooks.logger == base.default_hooks.logger  # the rest of default_hooks is kept
    elif "160k" in path.name:
        assert cfg.train_cfg.max_iters == 160000 and cfg.param_scheduler[-1].end == 160000


def test_karat_options_are_written_once() -> None:
    """Only the options base file spells out the paper's KArAt options."""
    spelled = [p.relative_to(REPO) for p in MMSEG.rglob("*.py") if "modular_mode=" in p.read_text()]
    assert spelled == [Path("mmseg_configs/_base_/models/karat.py")]
    spelled = [p.relative_to(REPO) for p in (REPO / "configs").rglob("*.py") if "modular_mode=" in p.read_text()]
    assert spelled == [Path("configs/common/karat.py")]


def test_schedule_is_written_once() -> None:
    spelled = [p.relative_to(REPO) for p in MMSEG.rglob("*.py") if "end=80000" in p.read_text()]
    assert spelled == [Path("mmseg_configs/_base_/schedules/warmup_poly_80k.py")]


def test_no_config_names_the_old_entry() -> None:
    """``custom_imports`` load the package (``mmseg_configs``); ``mmseg_configs.backbones`` still works for old
    configs since importing it runs the package's ``__init__``."""
    configs = [p for d in ("_base_", "upernet", "mmdet") for p in (MMSEG / d).rglob("*.py")]
    assert len(configs) > len(UPERNET)
    old = [p for p in configs if "mmseg_configs.backbones" in p.read_text()]
    assert not old


@pytest.mark.slow
def test_old_entry_still_registers_everything() -> None:
    """A user config with ``imports=['mmseg_configs.backbones']`` gets what ``['mmseg_configs']`` gives."""
    require("mmseg")
    import os
    import subprocess
    import sys

    code = ("import sys; from mmengine.utils import import_modules_from_strings\n"
            "import_modules_from_strings(['mmseg_configs.backbones'])\n"
            "from mmseg.registry import DATASETS, MODELS\n"
            "assert DATASETS.get('CheckedADE20KDataset') is not None\n"
            "assert None not in (MODELS.get('KArAtVisionTransformer'), MODELS.get('KArAtSwinTransformer'))\n"
            "assert 'mmseg_configs.flops' in sys.modules and 'mmseg_configs.compat' in sys.modules\n"
            "assert 'mmseg_configs.export' not in sys.modules  # the converter is not load-time code\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
