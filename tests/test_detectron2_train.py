"""Real detectron2 training on the embedded shapes set: the project's launcher (detectron2's trainer, hooks,
DetectionCheckpointer, COCOEvaluator) from a config with command-line overrides only, then --eval-only with the
saved checkpoint reproduces the metrics; a missing dataset folder is a clear error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import lazyconfig_train, require

require("detectron2")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/shapes/mask_rcnn_vitdet_karat_t_shapes.py"
# Only command-line overrides: a 2-block backbone, 2 iterations of 2 images, evaluation at the end.
SMALL = ["model.backbone.net.depth=2", "model.backbone.net.window_block_indexes=[0]",
         "model.backbone.net.embed_dim=48", "train.max_iter=2", "train.eval_period=2", "train.checkpointer.period=2",
         "train.log_period=1", "dataloader.train.total_batch_size=2"]


def _launch(args, data_root: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """tools/lazyconfig_train.py as a user runs it (one intra-op thread: the CI machine's 2 cores are shared)."""
    env = dict(os.environ, KARAT_SHAPES_ROOT=str(data_root), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "tools/lazyconfig_train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from detectron2_plugin.data import ShapesSpec, generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), ShapesSpec(num_train=8, num_val=3))


def test_dataset_is_deterministic_coco(tmp_path, shapes):
    from detectron2_plugin.data import ShapesSpec, annotation_file, generate_shapes

    again = generate_shapes(tmp_path / "again", ShapesSpec(num_train=8, num_val=3))
    for split in ("train", "val"):
        a, b = (json.loads(annotation_file(r, split).read_text()) for r in (shapes, again))
        assert a == b
        assert {c["name"] for c in a["categories"]} == {"circle", "square", "triangle"}
        for ann in a["annotations"]:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and ann["area"] > 0 and len(ann["segmentation"][0]) >= 6
    assert (shapes / "train" / "000001.png").read_bytes() == (again / "train" / "000001.png").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_shapes(again, ShapesSpec(num_train=8, num_val=3))


def test_missing_dataset_folder_is_a_clear_error(tmp_path):
    from detectron2.data import DatasetCatalog

    from detectron2_plugin.data import register_shapes

    names = register_shapes(tmp_path / "nowhere", prefix="karat_shapes_missing")
    with pytest.raises(FileNotFoundError, match="python -m detectron2_plugin.data --output"):
        DatasetCatalog.get(names["train"])


@pytest.mark.slow
def test_train_then_eval_only_reproduces_the_metrics(tmp_path, shapes):
    out = tmp_path / "run"
    r = _launch(["--config-file", CONFIG, *SMALL, f"train.output_dir={out}"], shapes)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("model_final.pth", "metrics.json", "config.yaml", "log.txt", "final_metrics.json"):
        assert (out / name).is_file(), name
    trained = json.loads((out / "final_metrics.json").read_text())
    assert set(trained) >= {"bbox", "segm"}  # COCOEvaluator ran both tasks
    events = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("total_loss" in e for e in events)  # the trainer's writer hook logged the losses

    # --eval-only through the launcher's main function (in this process, to save a second start-up).
    from detectron2_plugin.data import register_shapes

    register_shapes(shapes)
    lazyconfig_train(["--config-file", CONFIG, "--eval-only", *SMALL, f"train.output_dir={tmp_path / 'eval'}",
           f"train.init_checkpoint={out / 'model_final.pth'}"])
    evaluated = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert json.dumps(evaluated, sort_keys=True) == json.dumps(trained, sort_keys=True)



def test_launcher_errors(tmp_path):
    from detectron2_plugin.data import register_shapes

    with pytest.raises(ValueError, match="--eval-only needs the weights"):
        lazyconfig_train(["--config-file", CONFIG, "--eval-only", *SMALL, f"train.output_dir={tmp_path}"])
    register_shapes(tmp_path / "missing", prefix="karat_shapes_gone")
    with pytest.raises(FileNotFoundError, match="KArAt shapes dataset is not at"):
        lazyconfig_train(["--config-file", CONFIG, *SMALL, f"train.output_dir={tmp_path / 'x'}",
               "dataloader.train.dataset.names=karat_shapes_gone_train"])


@pytest.mark.slow
def test_eval_only_at_another_test_size(tmp_path, shapes, monkeypatch):
    """detectron2's own evaluation (the launcher's --eval-only: DetectionCheckpointer, COCOEvaluator) of the shapes
    config at 40 px without square padding: the global blocks, built for 32 px (16 x 16 tokens), see 20 x 20."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate

    from detectron2_plugin import backbone
    from detectron2_plugin.data import register_shapes

    register_shapes(shapes)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(ROOT / CONFIG)), SMALL)
    DetectionCheckpointer(instantiate(cfg.model), save_dir=str(tmp_path)).save("init")
    grids = set()
    real = backbone.KArAtViTAttention.forward
    monkeypatch.setattr(backbone.KArAtViTAttention, "forward",
                        lambda self, x, key_mask=None: grids.add(tuple(x.shape[1:3])) or real(self, x, key_mask))
    size = ["model.backbone.square_pad=0", "dataloader.test.mapper.augmentations.0.short_edge_length=40",
            "dataloader.test.mapper.augmentations.0.max_size=40"]
    lazyconfig_train(["--config-file", CONFIG, "--eval-only", *SMALL, *size, f"train.output_dir={tmp_path / 'eval'}",
                      f"train.init_checkpoint={tmp_path / 'init.pth'}"])
    assert set(json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())) >= {"bbox", "segm"}
    assert grids == {(4, 4), (20, 20)}  # the windows as built, the global block at the test size
