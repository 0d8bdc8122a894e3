"""The DeiT-style entry point on generated data in the datasets' real on-disk formats."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classification.args import get_args_parser
from classification.datasets import DatasetLayoutError, build_dataset
from karat import load_checkpoint
from karat.transfer import load_vit_source

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "vit_tiny_patch16_224_karat", "--input-size", "32", "--batch-size", "16", "--num_workers", "0",
        "--device", "cpu", "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "",
        "--drop-path", "0", "--grid", "2", "--hidden_dim", "4"]


def make_cifar10(root: Path, n_train: int = 48, n_test: int = 16) -> Path:
    """CIFAR-10's python layout: pickled dicts of uint8 rows (3 x 32 x 32) and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", n_train // 5 + 1) for i in range(1, 6)] + [("test_batch", n_test)]:
        labels = rng.integers(0, 10, n).tolist()
        data = np.stack([np.full(3072, 25 * lab, dtype=np.uint8) for lab in labels])  # learnable: brightness = class
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "classification.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_resume_and_eval_on_cifar10_files(tmp_path):
    data = make_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    common = [*FAST, "--data-set", "CIFAR10", "--data-path", str(data), "--output_dir", str(out)]
    run(*common, "--epochs", "2")
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "lr_scheduler", "scaler", "rng"} <= set(ckpt)
    source = load_vit_source(str(out / "checkpoint.pth"))  # the record a backbone converter rebuilds it from
    assert source.is_karat and source.karat_config() is not None and source.embed_dim == 192
    run(*common, "--epochs", "3", "--resume", str(out / "checkpoint.pth"))  # continues the same run
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    proc = run(*FAST, "--data-set", "CIFAR10", "--data-path", str(data), "--eval",
               "--resume", str(out / "checkpoint.pth"))
    assert "Accuracy of the network on the 16 test images: top-1" in proc.stdout


def test_imagenet_folder_and_layout_errors(tmp_path):
    args = get_args_parser().parse_args([*FAST, "--data-set", "IMNET", "--data-path", str(tmp_path / "nope")])
    with pytest.raises(DatasetLayoutError, match="does not exist.*train/<class>/<image>"):
        build_dataset(True, args)
    (tmp_path / "imnet" / "train").mkdir(parents=True)
    args.data_path = str(tmp_path / "imnet")
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        build_dataset(True, args)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / "imnet" / split / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "imnet" / split / c / "a.JPEG")
    args.batch_size = 2  # two images: one full batch
    ds, classes = build_dataset(True, args)
    assert classes == 2 and len(ds) == 2 and ds[0][0].shape == (3, 32, 32)
    args.data_set, args.data_path = "CIFAR10", str(tmp_path / "imnet")
    with pytest.raises(DatasetLayoutError, match="cifar-10-batches-py"):
        build_dataset(True, args)


@pytest.mark.slow
def test_two_process_torchrun_on_cpu(tmp_path):
    data = make_cifar10(tmp_path / "data")
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29517", "-m", "classification.main",
                           *FAST, "--data-set", "CIFAR10", "--data-path", str(data), "--output_dir", str(out),
                           "--epochs", "1", "--universal"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0]  # written once, by rank 0
    assert load_checkpoint(out / "checkpoint.pth")["args"]["universal"] is True


@pytest.mark.slow
def test_finetune_at_another_image_size_and_task(tmp_path):
    data = make_cifar10(tmp_path / "data")
    run(*FAST, "--data-set", "CIFAR10", "--data-path", str(data), "--output_dir", str(tmp_path / "pre"),
        "--epochs", "1")
    imnet = tmp_path / "imnet"
    for split in ("train", "val"):
        for c, color in (("cat", 40), ("dog", 200)):
            (imnet / split / c).mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (72, 72), (color, color, color)).save(imnet / split / c / f"{i}.JPEG")
    fast64 = [a if a != "32" else "64" for a in FAST]  # 64 px: 4 x 4 patches + class token instead of 2 x 2
    proc = run(*fast64, "--data-set", "IMNET", "--data-path", str(imnet), "--output_dir", str(tmp_path / "ft"),
               "--epochs", "1", "--finetune", str(tmp_path / "pre" / "checkpoint.pth"))
    assert "dropping head.weight" in proc.stderr and "Resampled" in proc.stderr
    ckpt = load_checkpoint(tmp_path / "ft" / "checkpoint.pth")
    assert ckpt["model"]["head.weight"].shape[0] == 2
    assert ckpt["model"]["blocks.0.attn.karat.operator.weight"].shape[1] == 17


def test_karat_flags_select_the_karat_twin_or_fail_clearly():
    from classification.main import build_model

    args = get_args_parser().parse_args([*FAST[2:], "--model", "vit_tiny_patch16_224", "--grid", "2"])
    model = build_model(args, 10)
    assert model.karat_cfg.grid == 2  # the paper's style: softmax name + KArAt flags -> the KArAt twin
    plain = build_model(get_args_parser().parse_args(["--model", "vit_tiny_patch16_224", "--input-size", "32"]), 10)
    assert not hasattr(plain, "karat_cfg")
    args = get_args_parser().parse_args(["--model", "resnet18", "--universal", "--input-size", "32"])
    with pytest.raises(ValueError, match="has no KArAt version"):
        build_model(args, 10)


# The paper's two ImageNet commands (ViT-Tiny, Fourier, G = 3, blockwise "G3B" and universal "G3U"), DeiT style.
PAPER_IMAGENET = {
    "G3B": "--model vit_tiny_patch16_224 --batch-size 256 --data-set IMNET --basis_type FourierBasis --grid 3 "
           "--hidden_dim 12 --modular_attn True --modular_mode phi1_w2 --blockwise --num_attention 1",
    "G3U": "--model vit_tiny_patch16_224 --batch-size 256 --data-set IMNET --basis_type FourierBasis --grid 3 "
           "--hidden_dim 12 --modular_attn True --modular_mode phi1_w2 --universal --num_attention 1",
}
# What makes them fit this CPU: appended, so argparse's last value wins; the commands themselves are unchanged.
TINY_RUN = ["--input-size", "32", "--epochs", "1", "--batch-size", "4", "--num_workers", "0", "--device", "cpu",
            "--warmup-epochs", "0", "--train-subset", "8"]


def _imagenet_tree(root: Path) -> Path:
    for split in ("train", "val"):
        for c, color in (("n01440764", 40), ("n01443537", 200)):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (color, i * 30, 0)).save(root / split / c / f"{i}.JPEG")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(PAPER_IMAGENET))
def test_paper_imagenet_commands_run_as_written_with_python_main_py(tmp_path, variant):
    data = _imagenet_tree(tmp_path / "imagenet")
    cmd = [sys.executable, "main.py", *PAPER_IMAGENET[variant].split(), "--data-path", str(data),
           "--output_dir", str(tmp_path / "out"), *TINY_RUN]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoint.pth")
    assert ckpt["model_name"] == "vit_tiny_patch16_224_karat"
    assert ckpt["model_kwargs"]["universal"] is (variant == "G3U") and ckpt["model_kwargs"]["grid"] == 3


def test_model_kwargs_and_a_clear_channel_mismatch_error():
    from classification.main import check_input_channels, model_spec

    args = get_args_parser().parse_args(["--model", "vit_tiny_patch16_224", "--data-set", "DIGITS", "--input-size", "8",
                                         "--model-kwargs", "patch_size=2", "in_chans=1", "class_token=False",
                                         "global_pool=avg"])
    name, kwargs = model_spec(args, 10)
    assert name == "vit_tiny_patch16_224" and kwargs["patch_size"] == 2 and kwargs["class_token"] is False
    digits, _ = build_dataset(False, args)
    import timm

    check_input_channels(timm.create_model(name, **kwargs), digits, args)  # 1 channel on both sides
    kwargs["in_chans"] = 3
    with pytest.raises(ValueError, match="add --model-kwargs in_chans=1"):
        check_input_channels(timm.create_model(name, **kwargs), digits, args)
