"""Run-time resampling (spec section 6): a KArAt core built for one token layout evaluates any other the host passes,
exactly as a model whose checkpoint ``karat.resample`` converted to that layout, gradients included, cached where
nothing needs gradients."""
import copy
import io
import pickle

import pytest
import torch

from conftest import assert_grads_close
from karat import KArAtConfig, KArAtCore, OperatorProvider, TokenLayout
from karat import resample as resample_mod
from karat.kernels import fused_cpu
from karat.resample import operator_at, resample_key_axis, resample_operator_state

CFG = dict(hidden_dim=4, grid=2)


def _core(layout: TokenLayout, dtype=torch.float64, **cfg) -> KArAtCore:
    core = KArAtCore(2, layout.num_tokens, KArAtConfig(**dict(CFG, **cfg)), layout=layout).to(dtype)
    with torch.no_grad():  # away from the initialisation (w_s = 1 everywhere would hide a wrong rescaling)
        for p in core.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return core


def _qkv(n: int, dtype=torch.float64, batch: int = 2):
    return [torch.randn(batch, 2, n, 3, dtype=dtype, requires_grad=True) for _ in range(3)]


def test_resampling_to_the_stored_layout_is_the_identity():
    layout = TokenLayout(1, (3, 5))
    t = torch.randn(2, layout.num_tokens, 4, dtype=torch.float64)
    assert torch.equal(resample_key_axis(t, 1, layout, layout, rescale=True), t)
    core = _core(layout).eval()
    assert operator_at(core.operator, layout, layout) is core.operator
    state = dict(core.operator.named_parameters())
    same = resample_operator_state(state, core.operator.key_axes(), layout, layout)
    assert all(torch.equal(same[k], v) for k, v in state.items())
    q, k, v = _qkv(layout.num_tokens)
    torch.testing.assert_close(core(q, k, v, layout=layout), core(q, k, v), rtol=0, atol=0)


CASES = [  # (stored, evaluated): larger, smaller, non-square, without prefix tokens
    (TokenLayout(1, (4, 4)), TokenLayout(1, (6, 6))),
    (TokenLayout(1, (6, 6)), TokenLayout(1, (3, 5))),
    (TokenLayout(0, (5, 5)), TokenLayout(0, (4, 7))),
    (TokenLayout(2, (4, 4)), TokenLayout(2, (5, 3))),
]


@pytest.mark.parametrize("src,dst", CASES, ids=["up", "down-nonsquare", "no-prefix", "registers"])
@pytest.mark.parametrize("impl,mode", [("reference", "phi1_w2"), ("auto", "phi1_w2"), ("auto", "w1_phi2"),
                                       ("auto", "depth2")])
def test_run_time_path_equals_a_converted_checkpoint(src, dst, impl, mode):
    """Values and gradients (inputs and stored weights) of the run-time path are those of a core built for ``dst``
    holding the ``karat.resample``-converted weights; for the stored weights, chained through the conversion."""
    extra = dict(modular_attn=False, depth=2) if mode == "depth2" else dict(modular_mode=mode)
    stored = _core(src, impl=impl, **extra)
    converted = KArAtCore(2, dst.num_tokens, stored.cfg, layout=dst).double()
    conv_state = resample_operator_state(stored.operator.state_dict(), stored.operator.key_axes(), src, dst)
    converted.operator.load_state_dict(conv_state)
    q, k, v = _qkv(dst.num_tokens)
    keep = torch.rand(2, 1, 1, dst.num_tokens) > 0.2  # a padding-style key mask as hosts pass
    out = stored(q, k, v, key_mask=keep, layout=dst)
    want = converted(q, k, v, key_mask=keep)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(out)
    weights = list(stored.operator.parameters())
    got = torch.autograd.grad(out, [q, k, v, *weights], dy)
    conv_weights = list(converted.operator.parameters())
    ref = torch.autograd.grad(want, [q, k, v, *conv_weights], dy)
    assert_grads_close(got[:3], ref[:3])
    # d/d(stored) = (d converted / d stored)^T d/d(converted): the conversion's own vector-Jacobian product
    leaves = {n: p.detach().requires_grad_() for n, p in stored.operator.named_parameters()}
    fn = resample_operator_state(leaves, stored.operator.key_axes(), src, dst)
    names = [n for n, _ in converted.operator.named_parameters()]
    chained = torch.autograd.grad([fn[n] for n in names], list(leaves.values()), ref[3:], allow_unused=True)
    assert_grads_close(got[3:], chained)


def test_the_cpu_kernel_serves_the_resampled_operator():
    if not fused_cpu.available():
        pytest.skip("the CPU kernel could not be built here")
    src, dst = TokenLayout(1, (5, 5)), TokenLayout(1, (6, 6))  # 37 keys > 24: auto takes the C++ kernel
    core = _core(src)
    op = core.operator_for(dst.num_tokens, dst)
    q, _, _ = _qkv(dst.num_tokens)
    assert core.choose_path(q, op=op).detail == "C++ CPU kernel"


def test_a_token_count_without_a_layout_is_refused_clearly():
    core = _core(TokenLayout(1, (4, 4)))
    q, k, v = _qkv(26)
    with pytest.raises(ValueError, match="built for 17 tokens but got 26, and the host gave no token layout"):
        core(q, k, v)
    with pytest.raises(ValueError, match="layout=.* for 26 keys"):
        core(q, k, v, layout=TokenLayout(1, (4, 4)))
    bare = KArAtCore(2, 17, KArAtConfig(**CFG))
    with pytest.raises(ValueError, match="built without its token layout"):
        bare(q, k, v, layout=TokenLayout(1, (5, 5)))


def _counting(monkeypatch):
    calls = []
    real = resample_mod.resample_operator_state

    def counted(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(resample_mod, "resample_operator_state", counted)
    return calls


def test_cached_outside_training_and_dropped_when_the_weights_change(monkeypatch):
    src, dst = TokenLayout(1, (4, 4)), TokenLayout(1, (5, 5))
    core = _core(src, dtype=torch.float32)
    calls = _counting(monkeypatch)
    q, k, v = (t.detach().float() for t in _qkv(dst.num_tokens))
    with torch.no_grad():
        first = core(q, k, v, layout=dst)
        torch.testing.assert_close(core(q, k, v, layout=dst), first, rtol=0, atol=0)
    assert len(calls) == 1  # the second call hit the cache
    for _ in range(2):  # training: resampled on every call, differentiably
        core(q, k, v, layout=dst).sum().backward()
    assert len(calls) == 3
    torch.optim.SGD(core.parameters(), lr=0.1).step()  # in place: the version counters move
    with torch.no_grad():
        stepped = core(q, k, v, layout=dst)
    assert len(calls) == 4 and not torch.allclose(stepped, first)
    core.load_state_dict(_core(src, dtype=torch.float32).state_dict())
    with torch.no_grad():
        core(q, k, v, layout=dst)
    assert len(calls) == 5
    core.double()
    with torch.no_grad():
        out = core(q.double(), k.double(), v.double(), layout=dst)
    assert len(calls) == 6 and out.dtype == torch.float64
    # never saved: not in the state dict, not pickled, not deep-copied
    assert all("cache" not in name and "skeleton" not in name for name in core.state_dict())
    op = core.operator
    assert "_karat_runtime_cache" in op.__dict__
    for clone in (copy.deepcopy(op), pickle.loads(pickle.dumps(op))):
        assert "_karat_runtime_cache" not in clone.__dict__ and "_karat_skeletons" not in clone.__dict__
    buffer = io.BytesIO()
    torch.save(core, buffer)
    assert b"_karat_runtime_cache" not in buffer.getvalue()


def test_universal_operator_is_resampled_once_per_layout(monkeypatch):
    src = TokenLayout(1, (4, 4))
    cfg = KArAtConfig(universal=True, **CFG)
    provider = OperatorProvider(cfg)
    blocks = [KArAtCore(2, src.num_tokens, cfg, provider, layout=src) for _ in range(4)]
    assert len({id(b.operator) for b in blocks}) == 1
    calls = _counting(monkeypatch)
    with torch.no_grad():
        for layout in (TokenLayout(1, (5, 5)), TokenLayout(1, (3, 6)), TokenLayout(1, (5, 5))):
            q, k, v = (torch.randn(1, 2, layout.num_tokens, 3) for _ in range(3))
            for block in blocks:
                block(q, k, v, layout=layout)
    assert calls == [TokenLayout(1, (5, 5)), TokenLayout(1, (3, 6))]


def test_gradients_reach_the_stored_weights_when_training_at_mixed_sizes():
    src = TokenLayout(1, (4, 4))
    core = _core(src, dtype=torch.float32).train()
    loss = 0
    for layout in (src, TokenLayout(1, (6, 6)), TokenLayout(1, (3, 5))):
        q, k, v = (torch.randn(2, 2, layout.num_tokens, 3) for _ in range(3))
        loss = loss + core(q, k, v, layout=layout).square().mean()
    loss.backward()
    grads = [p.grad for p in core.operator.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# timm ViT: dynamic_img_size, set_input_size, features at the input's size
# ---------------------------------------------------------------------------------------------------------------
VIT = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5, universal=False)


def _vit(**kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224_karat", **dict(VIT, **kwargs)).eval()


def test_timm_dynamic_img_size_equals_set_input_size():
    """A 32 px model evaluates 48 x 40 px (6 x 5 patches) as the same model moved there with set_input_size, which
    resamples the position embedding and the KArAt operators in place, as timm does."""
    dynamic = _vit(dynamic_img_size=True)
    moved = _vit()
    moved.load_state_dict(dynamic.state_dict())
    moved.set_input_size(img_size=(48, 40))
    assert moved.blocks[0].attn.karat.operator.num_tokens == 1 + 6 * 5
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), moved(x))
        native = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(dynamic(native), _vit(dynamic_img_size=True).eval()(native))  # unchanged at 32 px
    assert moved.blocks[0].attn.karat.layout == TokenLayout(1, (6, 5))


def test_timm_dynamic_img_pad_trains_at_any_size():
    model = _vit(dynamic_img_size=True, dynamic_img_pad=True).train()
    for size in ((44, 36), (32, 32), (20, 60)):  # padded to whole patches: 6 x 5, 4 x 4, 3 x 8
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 5)
        out.logsumexp(-1).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".karat." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_timm_features_at_the_input_size():
    import timm

    model = _vit(dynamic_img_size=True)
    x = torch.randn(1, 3, 48, 40)
    final, inter = model.forward_intermediates(x, indices=2)
    assert [t.shape[-2:] for t in inter] == [(6, 5), (6, 5)]
    torch.testing.assert_close(final, model.forward_features(x))
    feats = timm.create_model("vit_tiny_patch16_224_karat", features_only=True, out_indices=(0, 1),
                              dynamic_img_size=True, **{k: v for k, v in VIT.items() if k != "num_classes"})
    assert [f.shape[-2:] for f in feats(torch.randn(1, 3, 56, 24))] == [(7, 3), (7, 3)]


def test_convit_is_built_for_one_size_as_in_timm():
    import timm

    small = dict(img_size=32, patch_size=8, embed_dim=8, num_heads=2, depth=3, local_up_to_layer=2, num_classes=5)
    model = timm.create_model("convit_tiny_karat", **small)
    with pytest.raises(AssertionError, match="Input height \\(48\\) doesn't match model \\(32\\)"):  # timm's check
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="ConViT is built for one input size"):
        timm.create_model("convit_tiny_karat", dynamic_img_size=True, **small)
