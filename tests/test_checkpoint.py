import os
import pickle

import pytest
import torch

from karat import load_checkpoint, save_checkpoint


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_atomic_save_replaces_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"a": torch.ones(2)}, path)
    save_checkpoint({"a": torch.zeros(2), "epoch": 3}, path)
    assert load_checkpoint(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        save_checkpoint({"bad": lambda: None}, path)  # lambdas cannot be pickled
    torch.testing.assert_close(load_checkpoint(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
