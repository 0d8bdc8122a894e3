"""What a new user does first, run by ``tests/test_compile_fresh.py`` in a fresh process: nothing is imported, built
or called before the model is compiled, so the fused C++ kernel is loaded (or built) inside the first compiled call.

``python tests/compile_driver.py BACKEND [--explain] [--any-size]`` compiles a depth-2 KArAt ViT with the default
``impl`` and ``fullgraph=True`` as its very first call, runs two training steps (forward, backward, SGD step) with the
compiled model and the same steps eagerly on a copy, and prints one JSON line: the largest differences, the graphs
compiled, the evaluation path the cores took, with ``--explain`` ``torch._dynamo.explain``'s graph and break counts
for each ``impl`` that serves a CPU call, and what ``karat.kernels.fused_cpu`` logged. With ``--any-size`` the model
is built with ``dynamic_img_size=True`` and the compiled model trains at its native size, then at a smaller one
(its operators resampled at run time, ``karat.resample``). ``KARAT_CPU_KERNEL=0`` in the environment gives the
PyTorch blockwise path.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from typing import Dict

import timm
import torch

import karat

# 64 px in patches of 8: 65 tokens, more than REFERENCE_MAX_TOKENS for the C++ kernel (24) and for the PyTorch
# blockwise path (64), so impl='auto' takes the efficient path either way.
MODEL = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, drop_path_rate=0.0)


def _model(impl: str = "auto", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224_karat", impl=impl, **MODEL, **kwargs).train()


def _steps(model: torch.nn.Module, fn, batches) -> torch.Tensor:
    """Two SGD steps of ``fn`` (the model or its compiled form); the logits of each step, stacked."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        out = fn(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
        logits.append(out.detach())
    return torch.stack(logits)


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max() / (b[n].abs().max() + 1e-6)) for n in b)  # relative


def _grads(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


def _batches(size: int, count: int, seed: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, size, size, generator=gen), torch.randint(0, 10, (2,), generator=gen))
            for _ in range(count)]


def _compare(model, compiled, reference, batches) -> dict:
    """Train ``model`` through ``compiled`` and ``reference`` eagerly on the same batches: the largest differences
    of the logits, the parameters after the steps and the last gradients."""
    out = _steps(model, compiled, batches)
    ref_out = _steps(reference, reference, batches)
    params = {n: p.detach() for n, p in model.named_parameters()}
    ref_params = {n: p.detach() for n, p in reference.named_parameters()}
    return dict(logits=float((out - ref_out).abs().max() / ref_out.abs().max()),
                params=_max_diff(params, ref_params),
                grads=_max_diff(_grads(model), _grads(reference)))


def training_steps(backend: str) -> dict:
    """The compiled model's first call and training steps against eager mode's."""
    model = _model()
    reference = copy.deepcopy(model)
    start = time.perf_counter()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    # the first call of the process: compiles, and loads the kernel inside
    result = _compare(model, compiled, reference, _batches(MODEL["img_size"], 2))
    seconds = time.perf_counter() - start
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # 1: the second step reuses the first's
    core = next(m for m in model.modules() if isinstance(m, karat.KArAtCore))
    path = core.choose_path(torch.empty(1, 1, core.num_tokens, 1)).describe()
    return dict(result, path=path, graphs=graphs, seconds=round(seconds, 1))


def any_size(backend: str, sizes=(64, 48)) -> dict:
    """A ``dynamic_img_size`` model compiled with ``fullgraph=True``: a training step at each size in turn (the first
    native, the next with the operators resampled inside the compiled graph), against eager mode's; then
    ``torch._dynamo.explain`` at the last size. A graph break fails the step itself (``fullgraph``)."""
    model = _model(dynamic_img_size=True)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    steps = {str(size): _compare(model, compiled, reference, _batches(size, 1, seed=size)) for size in sizes}
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(_batches(sizes[-1], 1)[0][0])
    core = next(m for m in model.modules() if isinstance(m, karat.KArAtCore))
    tokens = (sizes[-1] // MODEL["patch_size"]) ** 2 + 1
    path = core.choose_path(torch.empty(1, 1, tokens, 1), op=core.operator_for(tokens, core.input_layout.get(tokens)))
    return dict(steps=steps, graphs=explained.graph_count, breaks=explained.graph_break_count,
                reasons=[str(r.reason).splitlines()[0] for r in explained.break_reasons], path=path.describe())


def graph_breaks() -> dict:
    """``torch._dynamo.explain`` of the forward for each impl that serves a CPU call: (graphs, breaks, reasons)."""
    x = torch.randn(2, 3, MODEL["img_size"], MODEL["img_size"])
    result = {}
    for impl in ("auto", "reference", "efficient"):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(_model(impl))(x)
        result[impl] = dict(graphs=explained.graph_count, breaks=explained.graph_break_count,
                            reasons=[str(r.reason).splitlines()[0] for r in explained.break_reasons])
    return result


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname}: {record.getMessage()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend")
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--any-size", action="store_true")
    args = parser.parse_args()
    records = _Records()
    logger = logging.getLogger("karat.kernels.fused_cpu")
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    report = dict(any_size=any_size(args.backend)) if args.any_size else dict(native=training_steps(args.backend))
    if args.explain:
        report["explain"] = graph_breaks()
    report["log"] = records.messages
    print(json.dumps(report))


if __name__ == "__main__":
    main()
