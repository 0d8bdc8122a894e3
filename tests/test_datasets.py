"""Classification datasets refuse what would silently train wrong: mismatched class folders, a training set that
cannot fill one batch, and layout errors that give advice which cannot work (issue 14, items 5 and 7)."""
import argparse
import errno
import urllib.error
from pathlib import Path

import pytest
from PIL import Image
from torchvision.datasets import svhn

from classification.args import get_args_parser
from classification.datasets import DatasetLayoutError, DatasetTooSmallError, build_dataset


def _args(*extra: str) -> argparse.Namespace:
    return get_args_parser().parse_args(["--input-size", "32", "--batch-size", "2", "--num_workers", "0",
                                         "--device", "cpu", "--aa", "", "--reprob", "0", *extra])


def _tree(root: Path, splits: dict) -> Path:
    """``{split: {class: n_images}}`` as an ImageFolder tree; each class has its own colour."""
    for split, classes in splits.items():
        for i, (c, n) in enumerate(sorted(classes.items())):
            (root / split / c).mkdir(parents=True)
            for j in range(n):
                Image.new("RGB", (36, 36), (60 * i, 10 * j, 0)).save(root / split / c / f"{j}.JPEG")
    return root


def test_validation_folder_is_accepted_and_labels_match_train(tmp_path):
    root = _tree(tmp_path / "imnet", {"train": {"a": 2, "b": 2, "c": 2}, "validation": {"a": 1, "b": 1, "c": 1}})
    args = _args("--data-set", "IMNET", "--data-path", str(root))
    train, n_train = build_dataset(True, args)
    val, n_val = build_dataset(False, args)
    assert n_train == n_val == 3
    assert train.class_to_idx == val.class_to_idx == {"a": 0, "b": 1, "c": 2}
    assert Path(val.root).name == "validation" and [t for _, t in val.samples] == [0, 1, 2]


def test_missing_validation_split_names_both_folders_and_where_it_looked(tmp_path):
    root = _tree(tmp_path / "imnet", {"train": {"a": 2}})
    with pytest.raises(DatasetLayoutError) as e:
        build_dataset(False, _args("--data-set", "IMNET", "--data-path", str(root)))
    msg = str(e.value)
    assert str(root / "val") in msg and str(root / "validation") in msg and f"searched in {root}" in msg


def test_train_and_val_class_sets_must_match(tmp_path):
    # val's `c` would be ImageFolder's label 1 on its own, but it is train's class 2: refused, not mislabelled
    root = _tree(tmp_path / "imnet", {"train": {"a": 2, "b": 2, "c": 2}, "val": {"a": 1, "c": 1}})
    args = _args("--data-set", "IMNET", "--data-path", str(root))
    for is_train in (True, False):
        with pytest.raises(DatasetLayoutError, match=r"only in train/: b; only in val/: none"):
            build_dataset(is_train, args)
    root2 = _tree(tmp_path / "imnet2", {"train": {"a": 2}, "val": {"a": 1, "zebra": 1}})
    with pytest.raises(DatasetLayoutError, match=r"only in train/: none; only in val/: zebra"):
        build_dataset(False, _args("--data-set", "IMNET", "--data-path", str(root2)))


def test_an_empty_validation_class_keeps_the_labels_of_the_classes_after_it(tmp_path):
    root = _tree(tmp_path / "imnet", {"train": {"a": 2, "b": 2, "c": 2}, "val": {"a": 1, "b": 0, "c": 1}})
    val, _ = build_dataset(False, _args("--data-set", "IMNET", "--data-path", str(root)))
    assert [t for _, t in val.samples] == [0, 2]


def test_a_training_set_smaller_than_one_batch_is_refused_clearly(tmp_path, monkeypatch):
    root = _tree(tmp_path / "imnet", {"train": {"a": 2, "b": 1}, "val": {"a": 1, "b": 1}})
    args = _args("--data-set", "IMNET", "--data-path", str(root), "--batch-size", "4")
    with pytest.raises(DatasetTooSmallError, match=r"3 images, fewer than one batch of --batch-size 4.*at most 3"):
        build_dataset(True, args)
    build_dataset(False, args)  # evaluation keeps every batch
    args.eval = True
    build_dataset(True, args)  # --eval never trains
    args.eval, args.batch_size = False, 2
    build_dataset(True, args)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun each process gets its share
    with pytest.raises(DatasetTooSmallError, match=r"1 per process with 2 processes"):
        build_dataset(True, args)
    monkeypatch.delenv("WORLD_SIZE")
    args.train_subset = 1
    with pytest.raises(DatasetTooSmallError, match="1 images"):
        build_dataset(True, args)


def test_the_entry_point_reports_a_too_small_set_instead_of_dividing_by_zero(tmp_path):
    from classification.main import main

    root = _tree(tmp_path / "imnet", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    with pytest.raises(DatasetTooSmallError, match="fewer than one batch"):
        main(_args("--data-set", "IMNET", "--data-path", str(root), "--batch-size", "4", "--epochs", "1"))


def test_layout_errors_only_suggest_a_download_where_one_can_work(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope")
    with pytest.raises(DatasetLayoutError) as e:
        build_dataset(True, _args("--data-set", "IMNET", "--data-path", missing))
    assert "Pass --download" not in str(e.value) and "cannot be downloaded" in str(e.value)
    with pytest.raises(DatasetLayoutError) as e:
        build_dataset(True, _args("--data-set", "IMNET", "--data-path", missing, "--download"))
    assert "Pass --download" not in str(e.value) and "does not apply" in str(e.value)
    with pytest.raises(DatasetLayoutError, match="Pass --download to let torchvision fetch it"):
        build_dataset(True, _args("--data-set", "CIFAR10", "--data-path", missing))
    (tmp_path / "empty").mkdir()
    # a download that failed (no network) must not advise one: torchvision's fetch fails here as it does offline,
    # whether or not this machine has a network (with one, it would fetch 180 MB)
    monkeypatch.setattr(svhn, "download_url", _unreachable)
    with pytest.raises(DatasetLayoutError) as e:
        build_dataset(True, _args("--data-set", "SVHN", "--data-path", str(tmp_path / "empty"), "--download"))
    assert "Pass --download" not in str(e.value) and "--download was given" in str(e.value)
    assert "Network is unreachable" in str(e.value)  # the error torchvision's download really raised


def _unreachable(url: str, *args, **kwargs) -> None:
    raise urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable"))
