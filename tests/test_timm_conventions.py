"""timm conventions timm's own suite relies on, checked fast on small models: Swin's in-place ``set_input_size``
(KArAt operators resampled like timm's bias tables), ConViT's ``features_only``, and torch.fx tracing."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules

import karat
from karat import KArAtOperator, TokenLayout, resample_karat_state_dict
from karat.models import KArAtWindowAttention

SWIN = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=5,
            grid=2, hidden_dim=4)


@pytest.mark.parametrize("sharing", ["blockwise", "universal"])
def test_swin_set_input_size_resamples_karat_operators_in_place(sharing):
    model = timm.create_model("swin_tiny_patch4_window7_224_karat", **{sharing: True}, **SWIN).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.layers[1].requires_grad_(False)  # frozen weights stay frozen, as timm's suite checks
    rng = torch.get_rng_state()
    model.set_input_size(img_size=(64, 64))  # timm scales the windows with the grid: 4 x 4 -> 8 x 8
    assert torch.equal(torch.get_rng_state(), rng)
    attns = [m for m in model.modules() if isinstance(m, KArAtWindowAttention)]
    assert all(a.window_size == (8, 8) and a.karat.num_tokens == a.karat.operator.num_tokens == 64 for a in attns)
    assert all(not p.requires_grad for p in model.layers[1].parameters())
    assert all(p.requires_grad for p in model.layers[0].parameters())
    ops = [{id(b.attn.karat.operator) for b in stage.blocks} for stage in model.layers]
    assert all(len(ids) == (1 if sharing == "universal" else 2) for ids in ops)  # sharing survives the move
    # the same tensors karat.resample gives a model built for 64 px with 8 x 8 windows
    target = timm.create_model("swin_tiny_patch4_window7_224_karat", **{sharing: True}, **dict(SWIN, img_size=64,
                                                                                            window_size=8))
    expected, report = resample_karat_state_dict(before, target, TokenLayout(0, (8, 8)), src=TokenLayout(0, (4, 4)))
    assert report.resampled
    moved = model.state_dict()
    for name in report.resampled:
        torch.testing.assert_close(moved[name], expected[name])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_convit_features_only_and_forward_intermediates():
    kw = dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, local_up_to_layer=2, grid=2, hidden_dim=4)
    feats = timm.create_model("convit_tiny_karat", features_only=True, out_indices=(0, 2), **kw).eval()
    assert sum(isinstance(m, KArAtOperator) for m in feats.modules()) == 3
    outs = feats(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 4, 4)] * 2  # ConViT's width is embed_dim x heads
    model = timm.create_model("convit_tiny_karat", **kw).eval()
    final, inter = model.forward_intermediates(torch.randn(1, 3, 32, 32))
    assert len(inter) == 3 and final.shape == (1, 17, 32)
    with pytest.raises(TypeError, match="takes a timm ConVit"):
        karat.models.karatize_convit(torch.nn.Linear(2, 2), karat.KArAtConfig())


@pytest.mark.parametrize("name, kw", [
    ("vit_tiny_patch16_224_karat", dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)),
    ("swin_tiny_patch4_window7_224_karat", dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2,),
                                                num_heads=(2,))),
    ("convit_tiny_karat", dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, local_up_to_layer=1)),
])
def test_fx_traces_around_the_karat_core(name, kw):
    model = timm.create_model(name, num_classes=5, grid=2, hidden_dim=4, **kw).eval()
    tracer = torch.fx.Tracer(autowrap_functions=tuple(get_notrace_functions()))
    tracer.is_leaf_module = lambda m, qualname: isinstance(m, tuple(get_notrace_modules())) or \
        torch.fx.Tracer.is_leaf_module(tracer, m, qualname)
    graph = torch.fx.GraphModule(model, tracer.trace(model))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(graph(x), model(x))
    calls = [n.target for n in graph.graph.nodes if n.op == "call_module"]
    assert any(t.endswith(".karat") for t in calls)  # the core is one leaf call; the host around it is traced
