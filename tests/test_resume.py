"""classification.main resumes exactly and loses nothing: an interrupted run continued with --resume equals an
uninterrupted one bit for bit (CPU), a kill -9 during a checkpoint write keeps the previous checkpoint, an output
folder holding a run is never overwritten, and a checkpoint that cannot continue this run says why."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from classification import main as cls_main
from classification.args import get_args_parser
from classification.resume import ResumeError, restore_rng_states, restore_scaler, rng_state
from conftest import require_cpu_kernel
import process_group
from ddp_driver import parse_reports
from karat import load_checkpoint
from karat.kernels import fused_cpu
from kernel_calls import CPU_KERNEL_MIN_TOKENS, cpu_kernel_calls

ROOT = Path(__file__).resolve().parents[1]
# The cheapest real run: scikit-learn's digits, a 2-block 32-wide KArAt ViT on 2 x 2 patches, 4 steps an epoch.
# Mixup (numpy), drop-path (torch) and the digits' random shift (torch) all draw random numbers.
TINY = ["--data-set", "DIGITS", "--input-size", "8", "--model", "vit_tiny_patch16_224", "--model-kwargs",
        "patch_size=2", "in_chans=1", "depth=2", "embed_dim=32", "num_heads=2", "--grid", "2", "--hidden_dim", "4",
        "--batch-size", "16", "--train-subset", "64", "--num_workers", "0", "--device", "cpu", "--warmup-epochs", "0",
        "--mixup", "0.8", "--cutmix", "0", "--drop-path", "0.1", "--lr", "2e-3", "--epochs", "3"]
# TINY has 17 keys, where `auto` materialises sigma(S). In patches of one pixel the same model sees 65 keys, more than
# karat.kernels.REFERENCE_MAX_TOKENS: `auto` runs the C++ CPU kernel, as it does for users' models.
KERNEL_SIZE = ["--model-kwargs", "patch_size=1", "in_chans=1", "depth=2", "embed_dim=32", "num_heads=2"]
assert (8 // 1) ** 2 + 1 >= CPU_KERNEL_MIN_TOKENS


def _args(out: Path, *extra: str):
    return get_args_parser().parse_args([*TINY, "--output_dir", str(out), *extra])


def _log(out: Path) -> list:
    """log.txt without the wall-clock field (the only thing a resumed run may log differently)."""
    rows = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]


def _assert_same_state(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


class _Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    cls_main.main(_args(out))
    return out


def _stop_after_first_checkpoint(out: Path, monkeypatch, *extra: str) -> None:
    """The run stops right after its first checkpoint (epoch 0 of 0, 1, 2)."""
    real_save = cls_main.save_checkpoint

    def save_then_stop(state, path):
        real_save(state, path)
        raise _Interrupted

    monkeypatch.setattr(cls_main, "save_checkpoint", save_then_stop)
    with pytest.raises(_Interrupted):
        cls_main.main(_args(out, *extra))
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0


def _assert_resumed_equals_uninterrupted(out: Path, uninterrupted: Path) -> None:
    assert _log(out) == _log(uninterrupted)  # losses, accuracies, max_accuracy, lr of every epoch
    a, b = load_checkpoint(uninterrupted / "checkpoint.pth"), load_checkpoint(out / "checkpoint.pth")
    assert b["epoch"] == 2 and b["max_accuracy"] == max(r["test_acc1"] for r in _log(uninterrupted))
    for key in ("model", "optimizer", "lr_scheduler", "rng"):
        _assert_same_state(a[key], b[key], key)
    assert json.loads((out / "args.json").read_text())["resume"] == ""  # the first run's args, kept
    assert json.loads((out / "args_resume_epoch1.json").read_text())["resume"] == str(out / "checkpoint.pth")


@pytest.mark.slow
def test_interrupted_run_resumed_equals_uninterrupted_bit_for_bit(tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "run"
    _stop_after_first_checkpoint(out, monkeypatch)
    cls_main.main(_args(out, "--resume", "auto"))
    _assert_resumed_equals_uninterrupted(out, uninterrupted)


@pytest.mark.slow
def test_resume_is_bit_exact_on_the_cpu_kernel(tmp_path, monkeypatch):
    """The same at 65 keys, where ``impl="auto"`` (the default, not pinned here) runs the C++ kernel forward and
    backward: its gradients must repeat bit for bit, or the resumed run drifts from the uninterrupted one."""
    require_cpu_kernel()
    full, out = tmp_path / "full", tmp_path / "run"
    with cpu_kernel_calls() as uninterrupted_calls:
        cls_main.main(_args(full, *KERNEL_SIZE))
    _stop_after_first_checkpoint(out, monkeypatch, *KERNEL_SIZE)
    with cpu_kernel_calls() as resumed_calls:
        cls_main.main(_args(out, *KERNEL_SIZE, "--resume", "auto"))
    assert min(uninterrupted_calls["forward"], uninterrupted_calls["backward"]) > 0, uninterrupted_calls
    assert min(resumed_calls["forward"], resumed_calls["backward"]) > 0, resumed_calls
    assert load_checkpoint(out / "checkpoint.pth")["model"]["blocks.0.attn.karat.operator.weight"].shape[1] == 65
    _assert_resumed_equals_uninterrupted(out, full)


def test_cpu_kernel_gradients_repeat_bit_for_bit_on_many_threads():
    """What bit-exact resume needs of the C++ kernel: the same inputs give the same gradients. Its threads each
    sum a coefficient gradient over their pairs of one head; with more threads than cores, several share a head
    and finish in a varying order, and summing their parts as they finished changed the last bits from call to
    call. The parts are summed in pair order."""
    require_cpu_kernel()
    q, k = (torch.randn(16, 2, 65, 16, requires_grad=True) for _ in range(2))
    coef = torch.randn(2, 65, 4, 4, requires_grad=True)  # (heads, keys, 2 G, r): grid G = 2
    dy = torch.randn(16, 2, 65, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(8)  # 4 threads per head
    try:
        grads = [torch.autograd.grad(fused_cpu.fourier_reduce(q, k, coef, 0.25, 2), (q, k, coef), dy)
                 for _ in range(6)]
    finally:
        torch.set_num_threads(threads)
    for again in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], again))


def test_output_dir_holding_a_run_is_refused_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"previous run")
    (out / "args.json").write_text("{}")
    with pytest.raises(FileExistsError) as e:
        cls_main.main(_args(out))
    message = str(e.value)
    assert str(out) in message and f"--resume {out / 'checkpoint.pth'}" in message and "--resume auto" in message
    assert "another --output_dir" in message
    with pytest.raises(FileExistsError, match="is not in it"):  # a checkpoint of another folder does not count
        cls_main.main(_args(out, "--resume", str(tmp_path / "elsewhere" / "checkpoint.pth")))
    with pytest.raises(FileExistsError, match="holds files"):  # auto, but nothing there to resume from
        (out / "checkpoint.pth").rename(out / "old.pth")
        cls_main.main(_args(out, "--resume", "auto"))
    assert (out / "old.pth").read_bytes() == b"previous run" and (out / "args.json").read_text() == "{}"


def test_another_architecture_is_named_before_loading(tmp_path, uninterrupted):
    ckpt = uninterrupted / "checkpoint.pth"
    with pytest.raises(ResumeError, match=r"grid: checkpoint 2, this run 3 \(set by --grid\)"):
        cls_main.main(_args(tmp_path / "a", "--resume", str(ckpt), "--grid", "3"))
    with pytest.raises(ResumeError, match=r"embed_dim: checkpoint 32, this run 48 \(set by --model-kwargs embed_dim"):
        cls_main.main(get_args_parser().parse_args([*TINY, "--output_dir", str(tmp_path / "b"), "--resume", str(ckpt),
                                                    "--model-kwargs", "patch_size=2", "in_chans=1", "depth=2",
                                                    "embed_dim=48", "num_heads=2"]))
    with pytest.raises(ResumeError, match="trained as vit_tiny_patch16_224_karat.*--model"):
        cls_main.main(_args(tmp_path / "c", "--resume", str(ckpt), "--model", "vit_small_patch16_224_karat"))


def test_bare_state_dict_loads_as_weights_only_with_a_warning(tmp_path, uninterrupted, caplog):
    bare = tmp_path / "weights.pth"
    torch.save(load_checkpoint(uninterrupted / "checkpoint.pth")["model"], bare)
    with caplog.at_level(logging.WARNING, logger="classification"):
        stats = cls_main.main(_args(tmp_path / "eval", "--eval", "--resume", str(bare)))
    assert "bare state dict" in caplog.text and "weights only" in caplog.text
    assert stats["top1"] == _log(uninterrupted)[-1]["test_acc1"]  # the same weights, evaluated again
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, bare)
    with pytest.raises(ResumeError, match="does not fit this model.*missing.*--finetune"):
        cls_main.main(_args(tmp_path / "eval", "--eval", "--resume", str(bare)))


def test_grad_scaler_across_amp_on_and_off(caplog):
    on = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    off = torch.amp.GradScaler("cpu", enabled=False)
    with caplog.at_level(logging.INFO, logger="classification"):
        restore_scaler(on, off.state_dict(), "fp32.pth")  # saved without AMP, resumed with it: no crash
        assert on.get_scale() == 2.0 ** 10 and "fresh loss scale" in caplog.text
        saved = torch.amp.GradScaler("cpu", init_scale=2.0 ** 7).state_dict()
        restore_scaler(off, saved, "amp.pth")  # saved with AMP, resumed without: ignored, said so
        assert "ignored" in caplog.text
        restore_scaler(on, saved, "amp.pth")
        assert on.get_scale() == 2.0 ** 7


def test_each_rank_restores_its_own_random_streams(caplog):
    states = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        g = torch.Generator().manual_seed(200 + rank)
        states.append(rng_state(g))
    expected = (torch.rand(3), torch.rand(3, generator=g))  # rank 1's streams, continued
    g = torch.Generator()
    torch.manual_seed(0)
    assert restore_rng_states(states, rank=1, world=2, generator=g)
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=g), expected[1])
    with caplog.at_level(logging.WARNING, logger="classification"):
        assert not restore_rng_states(states, rank=0, world=4, generator=g)
    assert "2 process(es), this run has 4" in caplog.text


_KILL_DURING_SAVE = """
import os, sys, time
from pathlib import Path
marker, argv = Path(sys.argv[1]), sys.argv[2:]
real_fsync, saves = os.fsync, []
def fsync(fd):  # the temporary file is written, the rename into checkpoint.pth not done yet
    real_fsync(fd)
    saves.append(fd)
    if len(saves) == 2:
        marker.write_text("writing epoch 1's checkpoint")
        time.sleep(600)
os.fsync = fsync
from classification.args import get_args_parser
from classification.main import main
main(get_args_parser().parse_args(argv))
"""


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one_and_resumes(tmp_path, caplog):
    out, marker = tmp_path / "run", tmp_path / "saving"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _KILL_DURING_SAVE, str(marker), *TINY, "--output_dir", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached its second checkpoint"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert list(out.glob(".checkpoint.pth.*.tmp")), "the killed save had written its temporary file"
    ckpt = load_checkpoint(out / "checkpoint.pth")  # intact: the previous (epoch 0) checkpoint
    assert ckpt["epoch"] == 0 and set(ckpt) >= {"model", "optimizer", "lr_scheduler", "rng", "max_accuracy"}
    assert [r["epoch"] for r in _log(out)] == [0, 1]  # epoch 1 was logged, its checkpoint lost

    with caplog.at_level(logging.INFO, logger="classification"):  # the restart (in this process: cheaper)
        cls_main.main(_args(out, "--resume", "auto"))
    assert f"resumed from {out / 'checkpoint.pth'} (epoch 0," in caplog.text
    assert [r["epoch"] for r in _log(out)] == [0, 1, 2]  # epoch 1 trained again, logged once
    assert [json.loads(x)["epoch"] for x in (out / "log.superseded.txt").read_text().splitlines()] == [1]
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 2
    assert not list(out.glob(".checkpoint.pth.*.tmp"))  # the killed save's leftover is cleaned up



# Under torchrun each rank draws its own drop-path masks, mixup coefficients and shifts. A constant schedule lets a
# 1-epoch run stand for the first epoch of a 2-epoch one.
TWO_RANKS = TINY[:-2] + ["--sched", "step", "--decay-epochs", "100", "--batch-size", "8"]
SIZES = {"17 keys": [], "65 keys": KERNEL_SIZE}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """For each size, an uninterrupted 2-epoch run and a 1-epoch run resumed for a second, by 2 processes. One
    torchrun (tests/ddp_driver.py) runs all six one after the other: each starts from its seed or its checkpoint,
    as it would in a process of its own. Returns the folder and the driver's ``{run: C++ kernel calls}``."""
    fused_cpu.available()  # built once here, not by both ranks at once
    root = tmp_path_factory.mktemp("two_ranks")
    runs = []
    for size, extra in SIZES.items():
        full, part = root / size / "full", root / size / "part"
        runs += [dict(name=f"{size} uninterrupted", argv=[*TWO_RANKS, *extra, "--output_dir", str(full),
                                                             "--epochs", "2"]),
                 dict(name=f"{size} first epoch", argv=[*TWO_RANKS, *extra, "--output_dir", str(part),
                                                           "--epochs", "1"]),
                 dict(name=f"{size} resumed", argv=[*TWO_RANKS, *extra, "--output_dir", str(part), "--epochs", "2",
                                                       "--resume", "auto"])]
    (root / "runs.json").write_text(json.dumps(runs))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = process_group.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(ROOT / "tests" / "ddp_driver.py"), f"runs={root / 'runs.json'}"],
                             cwd=ROOT, env=env, timeout=300)  # about 30 s alone on 2 cores
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-8000:]  # a hung rank's stack included
    done = parse_reports(proc.stdout)
    assert list(done) == [r["name"] for r in runs], proc.stdout[-2000:]
    return root, done


def _assert_two_rank_resume_exact(root: Path) -> None:
    """The checkpoint holds every rank's streams and each rank takes its own back: the resumed run equals the
    uninterrupted one."""
    a, b = (load_checkpoint(root / d / "checkpoint.pth") for d in ("full", "part"))
    assert len(b["rng"]) == 2 and not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])
    _assert_same_state(a["model"], b["model"], "model")
    _assert_same_state(a["optimizer"], b["optimizer"], "optimizer")
    _assert_same_state(a["rng"], b["rng"], "rng")
    assert _log(root / "full") == _log(root / "part")


@pytest.mark.slow
def test_two_rank_resume_gives_each_rank_its_own_streams(two_rank_runs):
    root, _ = two_rank_runs
    _assert_two_rank_resume_exact(root / "17 keys")


@pytest.mark.slow
def test_two_rank_resume_is_bit_exact_on_the_cpu_kernel(two_rank_runs):
    """The same at 65 keys, where ``impl="auto"`` runs the C++ kernel in every rank, forward and backward."""
    require_cpu_kernel()
    root, calls = two_rank_runs
    for run in ("uninterrupted", "first epoch", "resumed"):
        assert min(calls[f"65 keys {run}"]) > 0, (run, calls)
    _assert_two_rank_resume_exact(root / "65 keys")
