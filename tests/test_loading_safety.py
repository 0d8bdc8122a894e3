"""Loading trusts nothing: mmengine checkpoints load with exactly the globals mmengine's runner writes (no
``getattr``), a crafted checkpoint that reaches a callable is refused, detectron2's pickled ``.pkl`` files load
only with ``--allow-pickle``, and a truncated file is called corrupt or truncated (not a weights-only refusal)."""
from __future__ import annotations

import builtins
import io
import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import require
from karat.checkpoint import CorruptCheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    out = path.with_name("cut_" + path.name)
    out.write_bytes(data[:int(len(data) * keep)])
    return out


# ------------------------------------------------------------------------------------------ corrupt or truncated
def test_truncated_pth_and_safetensors_are_called_corrupt(tmp_path):
    from safetensors.torch import save_file

    from karat.transfer import load_vit_source

    torch.save({"model": {"w": torch.randn(64, 64)}, "epoch": 1}, tmp_path / "ckpt.pth")
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "w.safetensors"))
    for name in ("ckpt.pth", "w.safetensors"):
        cut = _truncate(tmp_path / name)
        for load in (load_checkpoint, load_vit_source):  # classification/resume, and every converter's reader
            with pytest.raises(CorruptCheckpointError, match="corrupt or truncated") as e:
                load(str(cut))
            assert "weights-only" not in str(e.value) and cut.name in str(e.value)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pth")
    assert load_checkpoint(tmp_path / "ckpt.pth")["epoch"] == 1  # the intact file still loads


# ------------------------------------------------------------------------------------------------ crafted pickles
class _Reduce:
    """A pickled call ``func(*args)``; ``func`` may itself be such a call (the chains an attacker builds)."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __call__(self, *a):  # pickle only pickles callables as a reduce's function
        raise AssertionError("never called while pickling")

    def __reduce__(self):
        return self.func, self.args


def _save(obj, path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": {"x": obj}}, path)
    return path


def _import_through_getattr():
    """getattr(getattr(getattr, "__self__"), "__import__"): with plain ``getattr`` allowed this returns
    ``builtins.__import__`` as a value (the finding of issue 14): ``getattr.__self__`` is the builtins module."""
    return _Reduce(getattr, _Reduce(getattr, getattr, "__self__"), "__import__")


def _globals_in(path: Path) -> set:
    """Every GLOBAL a torch.save file's pickle names, as ``module.name``."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    out = io.StringIO()
    pickletools.dis(data, out)
    names = set()
    for line in out.getvalue().splitlines():
        if "GLOBAL" in line:
            module, name = line.split("GLOBAL", 1)[1].strip().strip("'").split(" ")
            names.add(f"{'builtins' if module == '__builtin__' else module}.{name}")
    return names


def _name(entry) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


@pytest.fixture(scope="module")
def mmengine_checkpoint(tmp_path_factory) -> Path:
    """A resume checkpoint written by mmengine's own Runner (message hub, optimizer, schedulers, meta)."""
    require("mmengine")
    from test_framework_resume import mmengine_runner

    work = tmp_path_factory.mktemp("mmengine")
    mmengine_runner(work, 2, "safety").train()
    return work / "iter_2.pth"


def test_mmengine_allowlist_is_exactly_what_its_checkpoints_hold(mmengine_checkpoint):
    from mmengine.runner.checkpoint import CheckpointLoader

    from mmseg_configs.compat import mmengine_checkpoint_globals

    allowed = {_name(e) for e in mmengine_checkpoint_globals()}
    assert "builtins.getattr" in allowed and getattr not in mmengine_checkpoint_globals()  # the name, not the function
    held = _globals_in(mmengine_checkpoint)
    torch_own = {"torch._utils._rebuild_tensor_v2", "torch.FloatStorage", "torch.LongStorage", "_codecs.encode",
                 "collections.OrderedDict"}
    dtypes = {n for n in allowed if n.startswith("numpy.dtypes.")}  # built (BUILD), not named by GLOBAL
    assert held - torch_own == allowed - dtypes  # nothing missing, nothing extra
    ckpt = CheckpointLoader.load_checkpoint(str(mmengine_checkpoint), map_location="cpu")
    loss = ckpt["message_hub"]["log_scalars"]["train/loss"]
    assert loss.statistics("mean") == loss.mean() and ckpt["meta"]["iter"] == 2


@pytest.mark.parametrize("payload", ["import_chain", "os_system", "eval", "getattr_other"])
def test_mmengine_loader_refuses_a_crafted_callable(tmp_path, payload):
    require("mmengine")
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    import mmseg_configs.compat  # noqa: F401  installs the loader mmseg_configs uses

    obj = {"import_chain": _import_through_getattr(), "os_system": _Reduce(os.system, "echo pwned"),
           "eval": _Reduce(eval, "1 + 1"), "getattr_other": _Reduce(getattr, HistoryBuffer, "__init__")}[payload]
    path = _save(obj, tmp_path / "crafted.pth")
    with pytest.raises(pickle.UnpicklingError, match="Refused getattr" if "getattr" in payload or "chain" in payload
                       else "blocked|not an allowed global|Unsupported global"):
        CheckpointLoader.load_checkpoint(str(path), map_location="cpu")
    with pytest.raises(ValueError, match="Refused"):
        load_checkpoint(path)


def test_the_import_chain_is_a_real_attack_with_plain_getattr_allowed(tmp_path):
    """The crafted file above is no strawman: allowing ``getattr`` itself hands out ``builtins.__import__``."""
    path = _save(_import_through_getattr(), tmp_path / "crafted.pth")
    with torch.serialization.safe_globals([getattr]):
        loaded = torch.load(path, weights_only=True)
    assert loaded["meta"]["x"] is builtins.__import__


# ------------------------------------------------------------------------------------------- detectron2 pickles
def _d2_pickle(path: Path) -> Path:
    with open(path, "wb") as f:  # detectron2's model-zoo .pkl format: numpy arrays under "model"
        pickle.dump({"model": {"weight": np.full((2, 3), 7.0, np.float32), "bias": np.zeros(2, np.float32)},
                     "__author__": "test"}, f)
    return path


def test_detectron2_pkl_loads_only_with_allow_pickle(tmp_path):
    require("detectron2")
    from detectron2_plugin.checkpoint import PickleNotAllowedError, SafeDetectionCheckpointer

    pkl = _d2_pickle(tmp_path / "zoo.pkl")
    model = nn.Linear(3, 2)
    with pytest.raises(PickleNotAllowedError, match="--allow-pickle"):
        SafeDetectionCheckpointer(model).load(str(pkl))
    assert not torch.all(model.weight == 7)
    SafeDetectionCheckpointer(model, allow_pickle=True).load(str(pkl))
    assert torch.all(model.weight == 7)
    torch.save({"model": {"x": _Reduce(os.system, "echo pwned")}}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="Refused"):
        SafeDetectionCheckpointer(model).load(str(tmp_path / "evil.pth"))
    torch.save({"model": model.state_dict()}, tmp_path / "ok.pth")
    with pytest.raises(CorruptCheckpointError, match="corrupt or truncated"):
        SafeDetectionCheckpointer(model).load(str(_truncate(tmp_path / "ok.pth")))


def test_launcher_refuses_a_pkl_init_checkpoint_without_the_flag(tmp_path):
    require("detectron2")

    from detectron2_plugin.checkpoint import PickleNotAllowedError

    from tools import lazyconfig_train
    assert lazyconfig_train.argument_parser().parse_args(["--allow-pickle"]).allow_pickle
    assert not lazyconfig_train.argument_parser().parse_args([]).allow_pickle
    pkl = _d2_pickle(tmp_path / "zoo.pkl")
    with pytest.raises(PickleNotAllowedError, match="pickled checkpoint"):
        lazyconfig_train.invoke_main(["--config-file", "configs/shapes/mask_rcnn_vitdet_t_shapes.py", "--eval-only",
                                      "model.backbone.net.depth=2", "model.backbone.net.window_block_indexes=[0]",
                                      f"train.output_dir={tmp_path / 'out'}", f"train.init_checkpoint={pkl}"])
