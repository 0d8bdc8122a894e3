"""What one attention layer's training step costs the host: the ATen ops it dispatches and the kernels it launches.

At the widths of ViT-Tiny and ViT-Small a GPU finishes each kernel of an attention layer in microseconds, so a
step's time is mostly the host's: every dispatched op costs some microseconds of Python, dispatcher and autograd
bookkeeping, and those that launch a kernel cost a launch on top (benchmarks/README.md, "Host cost per layer").
This counts, for one forward + backward of timm's softmax ``Attention`` and of ``KArAtAttention`` on each path:
ops that can launch a kernel, view ops (metadata only), Triton launches, and the host time per step at a size
where the arithmetic is negligible.

Without CUDA the Triton path runs with its kernels replaced by launch counters: every op around them is the real
one, only the kernels' arithmetic is skipped, so its outputs are garbage and its time is the host's time alone.

  python -m tools.host_ops                       # softmax, fused (kernels stubbed on a CPU-only machine), efficient
  python -m tools.host_ops --device cuda --tokens 197 --batch 32
"""
from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PATHS = ("softmax", "fused", "efficient", "reference")


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active, split into views (no kernel) and the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view or func.overloadpacket in (torch.ops.aten.view, torch.ops.aten._unsafe_view):
            self.views += 1
        else:
            self.ops[str(func.overloadpacket).replace("aten.", "")] += 1
        return func(*args, **(kwargs or {}))

    @property
    def launching(self) -> int:
        return sum(self.ops.values())


@contextmanager
def stubbed_triton_kernels() -> Iterator[Counter]:
    """The fused path with its Triton kernels replaced by launch counters (and ``TRITON_INTERPRET=1`` so that
    ``supports()`` lets CPU tensors through): the host's side of the path runs for real, the kernels do not. Both
    fused variants are stubbed: flash-style (``fused_triton``) and whole-window (``fused_window``, <= 64 keys)."""
    from karat.kernels import fused_triton, fused_window

    launches: Counter = Counter()

    class Stub:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs) -> None:
                launches[self.name] += 1
            return launch

    saved = {(module, name): getattr(module, name) for module in (fused_triton, fused_window)
             for name in module.KERNELS}
    env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for module, name in saved:
            setattr(module, name, Stub(name))
        yield launches
    finally:
        for (module, name), kernel in saved.items():
            setattr(module, name, kernel)
        if env is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = env


def layer(path: str, dim: int, heads: int, tokens: int, device: torch.device) -> torch.nn.Module:
    """timm's softmax attention, or a KArAt G3B layer (Fourier, ``phi1_w2``) forced onto ``path``."""
    from timm.layers import Attention

    from karat import KArAtAttention, KArAtConfig

    if path == "softmax":
        return Attention(dim, num_heads=heads, qkv_bias=True).to(device)
    cfg = KArAtConfig(impl=path, basis_type="FourierBasis", grid=3, hidden_dim=12)
    return KArAtAttention(dim, num_heads=heads, qkv_bias=True, num_tokens=tokens, karat_cfg=cfg).to(device)


def measure(path: str, dim: int = 192, heads: int = 3, tokens: int = 16, batch: int = 1,
            device: str = "cpu", stub: Optional[bool] = None, repeat: int = 200) -> Dict[str, float]:
    """Ops and launches of one forward + backward, split at the backward call, and host ms per step."""
    dev = torch.device(device)
    stub = (path == "fused" and dev.type != "cuda") if stub is None else stub
    with (stubbed_triton_kernels() if stub else _nothing()) as launches:
        module = layer(path, dim, heads, tokens, dev)
        x = torch.randn(batch, tokens, dim, device=dev, requires_grad=True)

        def step(fwd: Optional[OpCounter] = None, bwd: Optional[OpCounter] = None) -> None:
            module.zero_grad(set_to_none=True)  # as a training step does: gradients are set, not accumulated
            x.grad = None
            with fwd or _nothing():
                loss = module(x).square().mean()
            with bwd or _nothing():
                loss.backward()

        step()
        step()
        before = Counter(launches)
        fwd, bwd = OpCounter(), OpCounter()
        step(fwd, bwd)
        kernels = sum((launches - before).values())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeat):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / repeat * 1e3
    return dict(path=path, size=(tokens, batch), stubbed=stub, forward_ops=fwd.launching, backward_ops=bwd.launching,
                views=fwd.views + bwd.views, triton=kernels, ms=ms, ops=dict(fwd.ops + bwd.ops))


@contextmanager
def _nothing():
    yield Counter()


def table(rows: List[Dict]) -> str:
    """A markdown table of :func:`measure` rows, host time as a ratio to the softmax row of the same size."""
    lines = ["| path | N | batch | launching ops fwd / bwd | view ops | Triton launches | host ms / step "
             "| vs softmax |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        soft = next((s for s in rows if s["path"] == "softmax" and s["size"] == r["size"]), None)
        name = r["path"] + (" (kernels stubbed)" if r["stubbed"] else "")
        ratio = f"{r['ms'] / soft['ms']:.2f}x" if soft else "-"
        lines.append(f"| {name} | {r['size'][0]} | {r['size'][1]} | {r['forward_ops']} / {r['backward_ops']} | "
                     f"{r['views']} | {r['triton']} | {r['ms']:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=["softmax", "fused", "efficient"])
    p.add_argument("--dim", type=int, default=192, help="embedding width (192: ViT-Tiny)")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--tokens", type=int, default=16, help="small, so that the arithmetic is negligible")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--top", type=int, default=0, help="also list the N most frequent launching ops per path")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = [measure(path, args.dim, args.heads, args.tokens, args.batch, args.device, repeat=args.repeat)
            for path in args.paths]
    print(f"one attention layer, forward + backward: dim {args.dim}, {args.heads} heads, N = {args.tokens}, "
          f"batch {args.batch}, {args.device}, torch {torch.__version__}\n")
    print(table(rows))
    for r in rows if args.top else []:
        top = ", ".join(f"{op} {n}" for op, n in Counter(r["ops"]).most_common(args.top))
        print(f"\n{r['path']}: {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
