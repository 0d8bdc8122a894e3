"""``karat-env://`` (karat/distributed.py): each start of a process group gets a namespace of its own in a store that
outlives it (torchrun's agent store), stale keys of killed workers are never read, and a missing rank is named."""
from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from karat.distributed import SCHEME, attempt_namespace, init_method

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store() -> dist.TCPStore:
    """A store like torchrun's agent store: it outlives every group started through it."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)


def _start(store: dist.TCPStore, world: int, timeout: float = 10.0, ranks=None) -> list:
    """Every rank's ``attempt_namespace`` in threads (each with its own client, as separate processes would)."""
    def one(rank: int) -> str:
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=10))
        return attempt_namespace(client, rank, world, timeout)

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(one, ranks if ranks is not None else range(world)))


def test_every_start_agrees_on_a_fresh_namespace_despite_a_killed_workers_keys(store):
    first = _start(store, world=3)
    assert len(set(first)) == 1
    store.set("karat/hello/1", "nonce-of-a-worker-that-was-killed")  # left behind by the killed attempt
    second = _start(store, world=3, ranks=[2, 1, 0])  # the restarted ranks come in any order
    assert len(set(second)) == 1 and second[0] != first[0]


def test_a_missing_rank_is_named_within_the_timeout(store):
    with pytest.raises(TimeoutError, match=r"rank\(s\) 2 did not join the process group within 0.5 s"):
        _start(store, world=3, timeout=0.5, ranks=[0, 1])
    client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=10))
    with pytest.raises(TimeoutError, match=r"rank 1 waited 0.5 s for rank 0"):
        attempt_namespace(client, 1, 2, 0.5)


def test_torch_resolves_the_scheme_for_init_process_group(monkeypatch):
    """Importing karat registers it with torch.distributed: ``dist.rendezvous`` (what ``init_process_group``
    calls with an init method) gives both ranks a store in the same fresh namespace, from torchrun's variables."""
    import karat  # noqa: F401

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert init_method(60) == f"{SCHEME}://?init_timeout=60"
    seen = {}

    def rank(r: int) -> None:  # threads, as one process holds one default group
        store, got_rank, world = next(dist.rendezvous(init_method(60), rank=r, world_size=2))
        store.set(f"from/{r}", str(r))
        seen[r] = (got_rank, world, store.get(f"from/{1 - r}"))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {0: (0, 2, b"1"), 1: (1, 2, b"0")}


def test_openmmlab_configs_start_their_groups_this_way():
    """mmseg / mmdet's launcher passes ``env_cfg.dist_cfg`` to ``init_process_group``; the configs' custom_imports
    (mmseg_configs) import karat, which registers the scheme before the runner starts the group."""
    from mmengine.config import Config

    configs = sorted((ROOT / "mmseg_configs").glob("*/*.py"))
    assert configs
    for path in configs:
        cfg = Config.fromfile(str(path))
        assert cfg.env_cfg.dist_cfg.get("init_method") == f"{SCHEME}://", path.name


# What classification.main and tests/ddp_driver.py do at the end of a run, many times over: a DDP step, a collective
# on tensors Python creates (all_gather_object, as the checkpoint's RNG states), then the teardown. With
# ``dist.barrier(); dist.destroy_process_group()`` instead, this hung within the first ten starts on 2 cores: the
# group's destructor joins gloo's worker thread holding the GIL, while that thread waits for the GIL to free the
# gathered tensors.
TEARDOWNS = """
import os, sys
from pathlib import Path
import torch, torch.distributed as dist
from karat.distributed import end_process_group, init_method
for i in range(int(sys.argv[1])):
    dist.init_process_group("gloo", init_method=init_method(60))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.randn(2, 4)).sum().backward()
    dist.all_gather_object([None, None], {"rank": os.environ["RANK"], "start": i})
    end_process_group()
    del model  # the reducer holds the group: its destructor runs here
Path(sys.argv[2], "ended-" + os.environ["RANK"]).write_text("")
"""


@pytest.mark.slow
def test_process_groups_end_without_the_gloo_teardown_deadlock(tmp_path):
    import os
    import sys

    import process_group

    script = tmp_path / "teardowns.py"
    script.write_text(TEARDOWNS)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = process_group.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(script), "25", str(tmp_path)], timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.glob("ended-*")) == ["ended-0", "ended-1"]
