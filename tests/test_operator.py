"""The KArAt operator, its bases and the core attention, checked against the spec's math."""
import math

import pytest
import torch
from torch.func import functional_call

from karat import KArAtAttention, KArAtConfig, KArAtCore, KArAtOperator, param_groups, project_to_simplex

BASES = [
    dict(basis_type="FourierBasis", grid=2),
    dict(basis_type="SplineBasis", grid=3, order=2, grid_range=(-2.0, 2.0)),
    *[dict(basis_type="WaveletBasis", wavelet_type=w) for w in ("mexican_hat", "morlet", "dog", "meyer", "shannon")],
    dict(basis_type="RationalBasis", rational_order=(3, 2)),
    dict(basis_type="FourierBasis", grid=1, base_fn="nn.SiLU"),
]
MODES = [dict(modular_mode="phi1_w2"), dict(modular_mode="w1_phi2"), dict(modular_attn=False, depth=2),
         dict(modular_attn=False, depth=1)]


def _attention(cfg: KArAtConfig, tokens: int = 5, dim: int = 8, heads: int = 2) -> KArAtAttention:
    return KArAtAttention(dim, num_heads=heads, qkv_bias=True, karat_cfg=cfg, num_tokens=tokens).double()


@pytest.mark.parametrize("impl", ["reference", "efficient"])
@pytest.mark.parametrize("basis", BASES, ids=lambda b: b.get("wavelet_type", b["basis_type"]) + b.get("base_fn", ""))
def test_gradcheck_every_basis(basis, impl):
    """Gradients with respect to the input and to every parameter are exact (float64)."""
    attn = _attention(KArAtConfig(hidden_dim=3, impl=impl, **basis))
    names = [n for n, p in attn.named_parameters() if p.requires_grad]
    params = tuple(dict(attn.named_parameters())[n].detach().clone().requires_grad_() for n in names)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return functional_call(attn, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


def _naive_sigma(op: KArAtOperator, s: torch.Tensor) -> torch.Tensor:
    """The spec's formulas written edge by edge with Python loops (Fourier basis, zero base)."""
    H, N, _ = s.shape
    G = op.cfg.grid
    out = torch.zeros(H, N, N, dtype=s.dtype)

    def phi(layer, h, q, p, x):  # w_s * sum_k a cos(kx) + b sin(kx)
        c = layer.basis.coefficients[h, q, p]
        return layer.basis_scale[h, q, p] * sum(c[k - 1] * math.cos(k * x) + c[G + k - 1] * math.sin(k * x)
                                                for k in range(1, G + 1))

    for h in range(H):
        for i in range(N):
            row = s[h, i].tolist()
            if op.mode == "phi1_w2":
                hidden = [sum(phi(op.phi, h, q, p, row[q]) for q in range(N)) for p in range(op.cfg.hidden_dim)]
                for j in range(N):
                    out[h, i, j] = sum(op.weight[h, j, p] * hidden[p] for p in range(op.cfg.hidden_dim))
            else:
                u = [sum(op.weight[h, p, j] * row[j] for j in range(N)) for p in range(op.cfg.hidden_dim)]
                for j in range(N):
                    out[h, i, j] = sum(phi(op.phi, h, p, j, float(u[p])) for p in range(op.cfg.hidden_dim))
    return out


@pytest.mark.parametrize("mode", ["phi1_w2", "w1_phi2"])
def test_operator_matches_the_formula_edge_by_edge(mode):
    cfg = KArAtConfig(grid=2, hidden_dim=3, modular_mode=mode)
    op = KArAtOperator(2, 4, cfg).double()
    s = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(op(s)[0], _naive_sigma(op, s[0]))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: str(m))
@pytest.mark.parametrize("basis", [BASES[0], BASES[2], BASES[7]], ids=["fourier", "wavelet", "rational"])
def test_masked_keys_change_nothing_and_get_zero_weight(mode, basis):
    cfg = KArAtConfig(hidden_dim=3, **mode, **basis)
    core = KArAtCore(2, 6, cfg).double()
    q, k, v = (torch.randn(2, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    # keys masked for every query (padding): their keys and values may be anything
    key_keep = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    out = core(q, k, v, bias=bias, key_mask=key_keep)
    sel = ~key_keep.transpose(-1, -2)  # (B, 1, N, 1)
    out2 = core(q, torch.where(sel, k + 5, k), torch.where(sel, 5 * torch.randn_like(v), v), bias=bias,
                key_mask=key_keep)
    torch.testing.assert_close(out, out2)
    # query-dependent masks (Swin's shifted windows): a masked logit may take any value
    keep = torch.rand(2, 1, 6, 6) > 0.4
    keep[..., 0] = True
    core.export_attention = True
    out = core(q, k, v, bias=bias, key_mask=keep)
    noise = torch.where(keep, torch.zeros(()), 100.0 * torch.randn(2, 2, 6, 6, dtype=torch.float64))
    out3 = core(q, k, v, bias=bias + noise, key_mask=keep)
    torch.testing.assert_close(out, out3)
    assert torch.all(core.last_attention[~keep.expand(2, 2, 6, 6)] == 0)
    assert not torch.equal(out, core(q, k, v, bias=bias))  # the mask did something


def test_project_l1_rows_on_the_simplex():
    cfg = KArAtConfig(project_l1=True, hidden_dim=4)
    core = KArAtCore(3, 10, cfg)
    core.export_attention = True
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    core(q, k, v)
    rows = core.last_attention
    assert rows.min() >= 0
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 3, 10), atol=1e-5, rtol=0)
    keep = torch.rand(2, 1, 10, 10) > 0.5
    keep[..., 3] = True
    core(q, k, v, key_mask=keep)
    torch.testing.assert_close(core.last_attention.sum(-1), torch.ones(2, 3, 10), atol=1e-5, rtol=0)
    assert torch.all(core.last_attention[~keep.expand(2, 3, 10, 10)] == 0)


def test_simplex_projection_is_the_euclidean_projection():
    v = torch.randn(50, 7, dtype=torch.float64)
    w = project_to_simplex(v)
    # optimality: w - v = -theta on the support, and >= -theta off it (KKT)
    for vi, wi in zip(v, w):
        theta = (vi - wi)[wi > 0]
        assert torch.allclose(theta, theta[0].expand_as(theta))
        assert torch.all(vi[wi == 0] <= theta[0] + 1e-12)


def test_mixed_heads_keep_softmax_on_the_others():
    cfg = KArAtConfig(mixed_head=True, num_attention=1)
    core = KArAtCore(3, 7, cfg)
    q, k, v = (torch.randn(2, 3, 7, 4) for _ in range(3))
    out = core(q, k, v)
    ref = torch.softmax(q[:, 1:] @ k[:, 1:].transpose(-1, -2) / 2.0, -1) @ v[:, 1:]
    torch.testing.assert_close(out[:, 1:], ref)
    assert core.operator.num_heads == 1


def test_token_count_mismatch_is_a_clear_error():
    core = KArAtCore(2, 7, KArAtConfig())
    q = torch.randn(1, 2, 9, 4)
    with pytest.raises(ValueError, match="built for 7 tokens but got 9"):
        core(q, q, q)


def test_freeze_flags():
    op = KArAtOperator(2, 5, KArAtConfig(basis_not_trainable=True, base_fn="nn.SiLU"))
    assert not op.phi.basis.coefficients.requires_grad and not op.phi.basis_scale.requires_grad
    assert op.phi.base_weight.requires_grad and op.weight.requires_grad
    op = KArAtOperator(2, 5, KArAtConfig(base_not_trainable=True, base_fn="nn.SiLU"))
    assert not op.phi.base_weight.requires_grad and op.phi.basis.coefficients.requires_grad


def test_param_groups_give_karat_parameters_attn_lr():
    attn = _attention(KArAtConfig())
    groups = param_groups(attn, weight_decay=0.05, attn_lr=1e-2)
    karat_ids = {id(p) for p in attn.karat.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        if g["name"].startswith("karat"):
            assert ids <= karat_ids and g["lr"] == 1e-2
        else:
            assert not ids & karat_ids and "lr" not in g
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in attn.parameters())
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert {g["lr"] for g in opt.param_groups} == {1e-3, 1e-2}


def test_key_axes_cover_every_key_indexed_parameter():
    for mode in MODES:
        op = KArAtOperator(2, 9, KArAtConfig(hidden_dim=3, **mode))
        axes = op.key_axes()
        params = dict(op.named_parameters())
        for name, dims in axes.items():
            assert all(params[name].shape[d] == 9 for d in dims), (mode, name)
