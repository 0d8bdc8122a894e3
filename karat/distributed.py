"""Process-group initialisation that survives ``torchrun --max-restarts``: the ``karat-env://`` init method.

Since torch 2.4 torchrun shares one TCPStore between its agent and the workers (``TORCHELASTIC_USE_AGENT_STORE``) and
keeps it across restarts. ``env://`` gives every attempt the same keys, so the workers of a restarted group can read
the peer addresses their killed predecessors left there: gloo then fails with ``connectFullMesh ... Connection
refused`` or waits for peers that will never come (pytorch/pytorch#135712). ``TORCHELASTIC_RESTART_COUNT`` cannot name
an attempt either: each node's agent counts its own restarts.

``karat-env://`` reads the same environment as ``env://`` and then isolates the attempt. Rank 0 draws a fresh
namespace, and every other rank gets it in answer to a nonce of its own, so no rank can pick up a stale one. The
process group then lives under that namespace. The wait is bounded (``init_timeout`` seconds, five minutes by
default), and a timeout names the rank that did not come. Importing ``karat`` registers the scheme, so any host that
takes an init method can use it: ``dist.init_process_group("gloo", init_method="karat-env://")``, mmengine's
``env_cfg.dist_cfg.init_method``, detectron2's ``--dist-url``.
"""
from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta
from typing import Iterator, Optional, Tuple
from urllib.parse import parse_qs, urlparse

import torch.distributed as dist

SCHEME = "karat-env"
DEFAULT_INIT_TIMEOUT = 300.0  # seconds; torch's default is the 30-minute collective timeout
_POLL = 0.02


def init_method(init_timeout: Optional[float] = None) -> str:
    """The init method URL, with a bound (seconds) on how long initialisation waits for the other ranks."""
    return f"{SCHEME}://" + (f"?init_timeout={init_timeout:g}" if init_timeout is not None else "")


def attempt_namespace(store: dist.Store, rank: int, world: int, timeout: float) -> str:
    """A namespace that every rank of this start of the group agrees on and no earlier start used.

    Rank 0 draws it and answers every rank's hello (a nonce written under that rank's key) with it; a rank trusts
    only the answer to its own nonce. Hellos left by killed workers get answers that nobody reads. Rank 0 returns
    once every rank confirmed under the new namespace, so all of them start the group together.
    """
    deadline = time.monotonic() + timeout
    if rank == 0:
        namespace = uuid.uuid4().hex
        answered: dict[int, bytes] = {}
        waiting = set(range(1, world))
        while waiting:
            for r in sorted(waiting):
                if store.check([f"karat/{namespace}/joined/{r}"]):
                    waiting.discard(r)
                elif store.check([f"karat/hello/{r}"]):
                    nonce = store.get(f"karat/hello/{r}")
                    if answered.get(r) != nonce:
                        store.set(f"karat/answer/{nonce.decode()}", namespace)
                        answered[r] = nonce
            if waiting and time.monotonic() > deadline:
                heard = {r: answered[r].decode() for r in sorted(waiting) if r in answered}
                raise TimeoutError(_waited_for(sorted(waiting), timeout)
                                   + f" (hellos answered from them, stale ones included: {heard or 'none'})")
            if waiting:
                time.sleep(_POLL)
        return namespace
    nonce = uuid.uuid4().hex
    store.set(f"karat/hello/{rank}", nonce)
    while not store.check([f"karat/answer/{nonce}"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank} waited {timeout:g} s for rank 0 to answer its hello {nonce} and start "
                               f"the process group: {_waited_for([0], timeout)}")
        time.sleep(_POLL)
    namespace = store.get(f"karat/answer/{nonce}").decode()
    store.set(f"karat/{namespace}/joined/{rank}", "1")
    return namespace


def _waited_for(ranks: list, timeout: float) -> str:
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return (f"rank(s) {', '.join(map(str, ranks))} did not join the process group within {timeout:g} s"
            + (f" (torchrun restart {restart})" if restart is not None else "")
            + ". Check that worker's log for the error that stopped it, or raise the limit (init_timeout, "
              "--dist-init-timeout) if it is only slow to start.")


def _rendezvous_handler(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs) -> Iterator[
        Tuple[dist.Store, int, int]]:
    """torch's rendezvous-handler protocol: yield (store, rank, world size) once."""
    query = {k: v[-1] for k, v in parse_qs(urlparse(url).query).items()}
    init_timeout = float(query.get("init_timeout", DEFAULT_INIT_TIMEOUT))
    rank = int(query.get("rank", os.environ.get("RANK", -1)))
    world = int(query.get("world_size", os.environ.get("WORLD_SIZE", -1)))
    if rank < 0 or world < 1:
        raise ValueError(f"{SCHEME}:// needs RANK and WORLD_SIZE (set by torchrun) or ?rank=&world_size= in the URL")
    store, rank, world = next(dist.rendezvous("env://", rank=rank, world_size=world,
                                              timeout=timedelta(seconds=init_timeout)))
    namespace = attempt_namespace(store, rank, world, init_timeout)
    yield dist.PrefixStore(f"karat/{namespace}/", store), rank, world
    raise RuntimeError(f"{SCHEME}:// cannot re-rendezvous; restart the workers (torchrun does)")


def end_process_group(settle: float = 0.2) -> None:
    """Tear the default process group down after every rank's last collective: a barrier, then ``settle`` seconds
    with the GIL free, then ``destroy_process_group``.

    A gloo worker thread frees a finished collective's tensors after the ranks have returned from waiting on it,
    and freeing a tensor that Python created takes the GIL (a barrier holds every earlier collective, say an
    ``all_gather_object``). The group's C++ destructor joins those threads while holding the GIL: if it runs in that
    window (at ``destroy_process_group``, or later when the last DDP model that holds the group is freed), both wait
    forever (pytorch/pytorch#56297). On 2 loaded cores it hung one teardown in a few dozen; the sleep lets the worker
    threads finish first (``tests/test_distributed_init.py`` repeats the pattern)."""
    dist.barrier()
    time.sleep(settle)
    dist.destroy_process_group()


def register() -> None:
    """Make ``karat-env://`` known to ``torch.distributed`` (idempotent)."""
    if not dist.is_available():
        return
    try:
        dist.register_rendezvous_handler(SCHEME, _rendezvous_handler)
    except RuntimeError:  # "already registered": karat imported twice (e.g. reloaded)
        pass
