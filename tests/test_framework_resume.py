"""Resuming in the two detection/segmentation hosts, checked against an uninterrupted run as far as each host
allows (classification.main's bit-exact check is tests/test_resume.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from conftest import lazyconfig_train, require

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- mmengine runner
class _Points(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return dict(x=torch.tensor([float(i), 1.0]), y=torch.tensor(0.5 * i))


def _toy_model():
    from mmengine.model import BaseModel

    class Toy(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(2, 1)

        def forward(self, x, y, mode: str = "tensor"):
            out = self.lin(x).squeeze(-1)
            return {"loss": ((out - y) ** 2).mean()} if mode == "loss" else out

    return Toy()


def _iteration_counter():
    from mmengine.hooks import Hook

    class Count(Hook):
        ran = 0

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            self.ran += 1

    return Count()


def mmengine_runner(work_dir: Path, max_iters: int, name: str, resume: bool = False, hooks=()):
    """A real mmengine Runner as mmseg's tools/train.py builds one (iteration loop, shuffled DefaultSampler,
    AdamW, a LR schedule, CheckpointHook every 2 iterations), around a two-parameter model."""
    from mmengine.runner import Runner

    import mmseg_configs.compat  # noqa: F401  the weights-only loader mmseg_configs installs

    return Runner(model=_toy_model(), work_dir=str(work_dir), experiment_name=name, default_scope="mmengine",
                  train_dataloader=dict(dataset=_Points(), sampler=dict(type="DefaultSampler", shuffle=True),
                                        batch_size=2, collate_fn=dict(type="default_collate")),
                  optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.05)),
                  param_scheduler=dict(type="LinearLR", start_factor=0.25, by_epoch=False, begin=0, end=6),
                  train_cfg=dict(by_epoch=False, max_iters=max_iters),
                  default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False),
                                     logger=dict(type="LoggerHook", interval=1)),
                  custom_hooks=list(hooks), randomness=dict(seed=0), resume=resume)


@pytest.mark.slow
def test_mmengine_runner_resume_equals_uninterrupted(tmp_path):
    """``--resume`` in mmseg's tools/train.py is ``Runner(resume=True)``: it reloads the weights, optimizer,
    schedulers and message hub and advances the sampler past the data already seen, so a run without random
    layers or augmentation continues bit for bit (asserted here). mmengine does not checkpoint the RNG states: on
    resume it seeds them again from ``randomness.seed``, so a real mmseg model (drop path, RandomResize/Crop/Flip
    in its pipeline) draws other random numbers after a resume than without one, and cannot be bit-exact."""
    require("mmengine")
    full = mmengine_runner(tmp_path / "full", 6, "full")
    full.train()
    part = mmengine_runner(tmp_path / "part", 3, "part")  # stops after 3 of 6 iterations (checkpoint at 2)
    part.train()
    counter = _iteration_counter()
    resumed = mmengine_runner(tmp_path / "part", 6, "resumed", resume=True, hooks=[counter])
    resumed.train()  # found work_dir/last_checkpoint (iter_3.pth)
    assert counter.ran == 3 and resumed.iter == full.iter == 6  # continued, not restarted
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    for key in ("train/loss", "train/lr"):  # every iteration's logged value, the restored history included
        a, b = (r.message_hub.get_scalar(key).data[0] for r in (full, resumed))
        assert a.tolist() == b.tolist(), key
    assert full.optim_wrapper.state_dict()["state"][0]["step"] == resumed.optim_wrapper.state_dict()["state"][0]["step"]


# ------------------------------------------------------------------------------------------- detectron2 trainer
SHAPES_CONFIG = "configs/shapes/mask_rcnn_vitdet_karat_t_shapes.py"
SMALL = ["model.backbone.net.depth=2", "model.backbone.net.window_block_indexes=[0]",
         "model.backbone.net.embed_dim=48", "train.checkpointer.period=2", "train.log_period=1",
         "train.eval_period=100", "dataloader.train.total_batch_size=2", "train.max_iter=4", "train.seed=0"]



def _events(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    return {r["iteration"]: r for r in rows if "lr" in r}


@pytest.mark.slow
def test_detectron2_resume_continues_the_iterations(tmp_path, monkeypatch):
    """detectron2's ``--resume`` reloads weights, optimizer, LR schedule (the LRScheduler hook's state), the AMP
    grad scaler and the iteration from ``last_checkpoint``, and the trainer continues from the next iteration.
    It is not bit-exact, by design of detectron2: ``TrainingSampler`` is an infinite stream seeded once per
    process, so a resumed process starts the image order again from its beginning, and the RNG states are not
    checkpointed. Asserted: the resumed run starts from the checkpoint (iterations 2 and 3 only, the optimizer's
    step count continued) and follows the same learning-rate schedule as the uninterrupted run."""
    require("detectron2")
    from detectron2_plugin.data import ShapesSpec, generate_shapes, register_shapes

    shapes = generate_shapes(tmp_path / "shapes", ShapesSpec(num_train=8, num_val=2))
    monkeypatch.setenv("KARAT_SHAPES_ROOT", str(shapes))
    register_shapes(shapes)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    lazyconfig_train(["--config-file", SHAPES_CONFIG, *SMALL, f"train.output_dir={full}"])
    resumed.mkdir()
    shutil.copy(full / "model_0000001.pth", resumed / "model_0000001.pth")  # the run as it was after iteration 2 of 4
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    lazyconfig_train(["--config-file", SHAPES_CONFIG, "--resume", *SMALL, f"train.output_dir={resumed}"])

    a, b = _events(full), _events(resumed)
    assert sorted(a) == [0, 1, 2, 3] and sorted(b) == [2, 3]  # continued, not restarted
    assert [b[i]["lr"] for i in (2, 3)] == [a[i]["lr"] for i in (2, 3)]
    final = torch.load(resumed / "model_final.pth", weights_only=True)
    assert final["iteration"] == 3
    steps = {int(s["step"]) for s in final["trainer"]["optimizer"]["state"].values()}
    assert steps == {4}  # 2 steps before the checkpoint + 2 after
