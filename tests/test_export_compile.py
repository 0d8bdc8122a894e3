"""Every KArAt model family passes ``torch.export.export`` and ``torch.compile(fullgraph=True)``, forward and backward
on the CPU, with each ``impl`` that can serve a CPU call (TorchScript is deprecated upstream; these replace it).

Tiny configs keep it affordable: ViT (class token), Swin (two blocks, so the shifted-window mask is exercised) and
ConViT (a GPSA block and a plain block). Outputs and every gradient must equal eager mode's.
Compilation uses ``aot_eager``: Dynamo's full graph and AOTAutograd's backward, which is what our code can break.
Inductor's code generation on top costs 45-115 s per model on two cores; ``KARAT_TEST_INDUCTOR=1`` adds that case.
The default ``impl`` as a new user meets it (a fresh process whose first call is compiled, the C++ kernel loaded
inside it, Inductor) is ``tests/test_compile_fresh.py``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

import pytest
import timm
import torch

import karat  # noqa: F401  registers the KArAt models

FAMILIES: Dict[str, Tuple[str, dict]] = {
    "vit": ("vit_tiny_patch16_224_karat", dict(patch_size=8, embed_dim=16, depth=1, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224_karat",
             dict(patch_size=4, window_size=4, embed_dim=16, depths=(2,), num_heads=(2,))),
    "convit": ("convit_tiny_karat", dict(patch_size=8, embed_dim=16, depth=2, num_heads=2, local_up_to_layer=1)),
}
IMPLS = ("reference", "efficient")  # 'fused' needs CUDA; 'auto' picks one of these on the CPU


def _model(family: str, impl: str) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, num_classes=5, drop_path_rate=0.0, impl=impl, hidden_dim=4,
                              grid=2, **kwargs)
    cores = [m for m in model.modules() if isinstance(m, karat.KArAtCore)]
    assert cores and all(c.resolve_impl() == impl for c in cores)  # the path under test really serves the call
    return model.train()


def _run(fn: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = fn(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check_against_eager(family: str, impl: str,
                         transform: Callable[[torch.nn.Module], Tuple[Callable, torch.nn.Module]]) -> None:
    """``transform(model)`` gives the function to run and the module that holds the parameters it trains."""
    model = _model(family, impl)
    x = torch.randn(2, 3, 32, 32)
    ref_out, ref_grads = _run(model, model, x)
    fn, holder = transform(model)
    out, grads = _run(fn, holder, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient for {missing[:3]}"
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


def _exported(model: torch.nn.Module) -> Tuple[Callable, torch.nn.Module]:
    module = torch.export.export(model, (torch.randn(2, 3, 32, 32),)).module()
    return module, module  # the exported module holds the parameters, under the same names


def _compiled(backend: str) -> Callable[[torch.nn.Module], Tuple[Callable, torch.nn.Module]]:
    def transform(model: torch.nn.Module) -> Tuple[Callable, torch.nn.Module]:
        torch._dynamo.reset()
        return torch.compile(model, fullgraph=True, backend=backend), model
    return transform


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torch_export_forward_and_backward(family, impl):
    _check_against_eager(family, impl, _exported)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torch_compile_fullgraph_forward_and_backward(family, impl):
    _check_against_eager(family, impl, _compiled("aot_eager"))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KARAT_TEST_INDUCTOR") != "1",
                    reason="Inductor codegen takes minutes on CPU; set KARAT_TEST_INDUCTOR=1")
def test_torch_compile_inductor_on_the_efficient_path():
    _check_against_eager("vit", "efficient", _compiled("inductor"))
