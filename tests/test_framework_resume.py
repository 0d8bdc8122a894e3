"""Resuming in the two detection/segmentation hosts: the final weights of a resumed run are compared with an
uninterrupted run's, tensor by tensor, bit for bit where the host allows it and otherwise to a stated tolerance
(classification.main's bit-exact check is tests/test_resume.py). Both runs' KArAt attentions have more than
``karat.kernels.REFERENCE_MAX_TOKENS`` keys, so ``impl="auto"`` runs them on the C++ CPU kernel."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from conftest import lazyconfig_train, require, require_cpu_kernel
from kernel_calls import cpu_kernel_calls

ROOT = Path(__file__).resolve().parents[1]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    """Every tensor of two state dicts: equal (``atol=0``) or within ``atol``."""
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        if atol:
            torch.testing.assert_close(b[name], tensor, rtol=0.0, atol=atol, msg=name)
        else:
            assert torch.equal(b[name], tensor), name


# ---------------------------------------------------------------------------------------------- mmengine runner
class _Images(Dataset):
    """Eight fixed 5 x 5 one-channel images with a regression target each."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return dict(x=torch.randn(1, 5, 5, generator=g), y=torch.randn((), generator=g))


def _karat_model():
    """A one-block KArAt ViT on the 5 x 5 images in patches of one pixel: 25 patches and the class token, 26 keys."""
    import timm
    from mmengine.model import BaseModel

    import karat  # noqa: F401  registers the KArAt models with timm

    class Regressor(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = timm.create_model("vit_tiny_patch16_224_karat", img_size=5, patch_size=1, in_chans=1,
                                         embed_dim=16, depth=1, num_heads=2, num_classes=1, grid=2, hidden_dim=4)

        def forward(self, x, y, mode: str = "tensor"):
            out = self.net(x).squeeze(-1)
            return {"loss": ((out - y) ** 2).mean()} if mode == "loss" else out

    return Regressor()


def _iteration_counter():
    from mmengine.hooks import Hook

    class Count(Hook):
        ran = 0

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            self.ran += 1

    return Count()


def mmengine_runner(work_dir: Path, max_iters: int, name: str, resume: bool = False, hooks=()):
    """A real mmengine Runner as mmseg's tools/train.py builds one (iteration loop, shuffled DefaultSampler,
    AdamW, a LR schedule, CheckpointHook every 2 iterations), around a tiny KArAt ViT."""
    from mmengine.runner import Runner

    import mmseg_configs.compat  # noqa: F401  the weights-only loader mmseg_configs installs

    return Runner(model=_karat_model(), work_dir=str(work_dir), experiment_name=name, default_scope="mmengine",
                  train_dataloader=dict(dataset=_Images(), sampler=dict(type="DefaultSampler", shuffle=True),
                                        batch_size=2, collate_fn=dict(type="default_collate")),
                  optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.01)),
                  param_scheduler=dict(type="LinearLR", start_factor=0.25, by_epoch=False, begin=0, end=6),
                  train_cfg=dict(by_epoch=False, max_iters=max_iters),
                  default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False),
                                     logger=dict(type="LoggerHook", interval=1)),
                  custom_hooks=list(hooks), randomness=dict(seed=0), resume=resume)


@pytest.mark.slow
def test_mmengine_runner_resume_equals_uninterrupted(tmp_path):
    """``--resume`` in mmseg's tools/train.py is ``Runner(resume=True)``: it reloads the weights, optimizer,
    schedulers and message hub and advances the sampler past the data already seen, so a run without random
    layers or augmentation continues bit for bit: the final checkpoints hold the same tensors. mmengine does not
    checkpoint the RNG states: on resume it seeds them again from ``randomness.seed``, so a real mmseg model (drop
    path, RandomResize/Crop/Flip in its pipeline) draws other random numbers after a resume than without one, and
    cannot be bit-exact."""
    require("mmengine")
    from mmengine.registry import DefaultScope

    from mmseg_configs.compat import load_from_local

    # each Runner makes its default scope the current one; dropped afterwards, so later builds do not inherit it
    with DefaultScope.overwrite_default_scope("mmengine"), cpu_kernel_calls() as calls:
        full = mmengine_runner(tmp_path / "full", 6, "full")
        full.train()
        part = mmengine_runner(tmp_path / "part", 3, "part")  # stops after 3 of 6 iterations (checkpoint at 2)
        part.train()
        counter = _iteration_counter()
        resumed = mmengine_runner(tmp_path / "part", 6, "resumed", resume=True, hooks=[counter])
        resumed.train()  # found work_dir/last_checkpoint (iter_3.pth)
    assert counter.ran == 3 and resumed.iter == full.iter == 6  # continued, not restarted
    a, b = (load_from_local(str(tmp_path / d / "iter_6.pth"))["state_dict"] for d in ("full", "part"))  # weights only
    assert any(".karat.operator." in k for k in a)
    assert_same_weights(a, b)
    assert_same_weights(full.model.state_dict(), resumed.model.state_dict())
    for key in ("train/loss", "train/lr"):  # every iteration's logged value, the restored history included
        x, y = (r.message_hub.get_scalar(key).data[0] for r in (full, resumed))
        assert x.tolist() == y.tolist(), key
    assert full.optim_wrapper.state_dict()["state"][0]["step"] == resumed.optim_wrapper.state_dict()["state"][0]["step"]
    require_cpu_kernel()
    assert min(calls["forward"], calls["backward"]) > 0, calls  # 26 keys: impl="auto" ran the C++ kernel


# ------------------------------------------------------------------------------------------- detectron2 trainer
SHAPES_CONFIG = "configs/shapes/mask_rcnn_vitdet_karat_t_shapes.py"
SMALL = ["model.backbone.net.depth=2", "model.backbone.net.window_block_indexes=[0]",
         "model.backbone.net.embed_dim=48", "train.checkpointer.period=2", "train.log_period=1",
         "train.eval_period=100", "dataloader.train.total_batch_size=2", "train.max_iter=4", "train.seed=0"]
# What detectron2 does not checkpoint, and a resumed process therefore starts again from its beginning, taken out
# of the run: the sampler's position in its infinite stream (one training image: every batch is the same two
# copies of it), the random augmentations, drop path, and the random choice of RPN anchors and ROI proposals (every
# one of them is taken). Only the order in which the ROI heads see their proposals stays random.
REPEATABLE = ["dataloader.train.mapper.augmentations=[]", "model.backbone.net.drop_path_rate=0.0",
              "model.proposal_generator.batch_size_per_image=100000", "model.roi_heads.batch_size_per_image=100000"]
# That order changes the order of the sums over proposals (losses, ROIAlign's backward), so the weights two
# iterations after the resume differ by float32 rounding (1.5e-8 at most, measured); with the sampler and the
# augmentations left random they differ by 2e-3, more than these two iterations move them (1.5e-3).
ROUNDING = 1e-6


def _events(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    return {r["iteration"]: r for r in rows if "lr" in r}


@pytest.mark.slow
def test_detectron2_resume_continues_the_iterations(tmp_path, monkeypatch):
    """detectron2's ``--resume`` reloads weights, optimizer, LR schedule (the LRScheduler hook's state), the AMP
    grad scaler and the iteration from ``last_checkpoint``, and the trainer continues from the next iteration.
    It is not bit-exact by design of detectron2: ``TrainingSampler`` is an infinite stream seeded once per process,
    so a resumed process starts the image order again from its beginning, and the RNG states are not checkpointed.
    With those taken out of the run (REPEATABLE), the resumed run's final weights equal the uninterrupted run's to
    float32 rounding (ROUNDING), every tensor; it starts from the checkpoint (iterations 2 and 3 only, the
    optimizer's step count continued) and follows the same learning-rate schedule."""
    require("detectron2")
    from detectron2_plugin.data import ShapesSpec, generate_shapes, register_shapes

    shapes = generate_shapes(tmp_path / "shapes", ShapesSpec(num_train=1, num_val=2))
    monkeypatch.setenv("KARAT_SHAPES_ROOT", str(shapes))
    register_shapes(shapes)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    with cpu_kernel_calls() as calls:
        lazyconfig_train(["--config-file", SHAPES_CONFIG, *SMALL, *REPEATABLE, f"train.output_dir={full}"])
        resumed.mkdir()
        shutil.copy(full / "model_0000001.pth", resumed / "model_0000001.pth")  # the run after iteration 2 of 4
        (resumed / "last_checkpoint").write_text("model_0000001.pth")
        lazyconfig_train(["--config-file", SHAPES_CONFIG, "--resume", *SMALL, *REPEATABLE,
                          f"train.output_dir={resumed}"])

    a, b = _events(full), _events(resumed)
    assert sorted(a) == [0, 1, 2, 3] and sorted(b) == [2, 3]  # continued, not restarted
    assert [b[i]["lr"] for i in (2, 3)] == [a[i]["lr"] for i in (2, 3)]
    final, uninterrupted = (torch.load(d / "model_final.pth", weights_only=True) for d in (resumed, full))
    assert final["iteration"] == 3
    steps = {int(s["step"]) for s in final["trainer"]["optimizer"]["state"].values()}
    assert steps == {4}  # 2 steps before the checkpoint + 2 after
    assert any(".karat.operator." in k for k in final["model"])
    assert_same_weights(uninterrupted["model"], final["model"], atol=ROUNDING)
    require_cpu_kernel()
    assert min(calls["forward"], calls["backward"]) > 0, calls  # the global blocks (256 keys) on the C++ kernel
