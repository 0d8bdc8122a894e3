"""karat.analysis on tiny models: every function checked against numbers known in advance."""
import math

import pytest
import timm
import torch
import torch.nn as nn

import karat  # noqa: F401
from karat import KArAtConfig, KANLayer
from karat.analysis import attention, functions, landscape, path, spectral, weights

TINY = dict(img_size=8, patch_size=2, embed_dim=24, depth=2, num_heads=3, num_classes=5, in_chans=1,
            class_token=False, global_pool="avg")


def tiny(karat_model: bool = True, **kw) -> nn.Module:
    name = "vit_tiny_patch16_224_karat" if karat_model else "vit_tiny_patch16_224"
    return timm.create_model(name, **{**TINY, **kw}).eval()


# ------------------------------------------------------------------------------------------------ spectra
def test_rank_r_operator_has_r_nonzero_singular_values():
    n, r = 16, 3
    u, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    s = torch.tensor([5.0, 2.0, 0.5] + [0.0] * (n - r), dtype=torch.float64)
    a = u @ torch.diag(s) @ v.T
    sv = spectral.singular_values(a)
    torch.testing.assert_close(sv[:r], s[:r])
    assert int(spectral.numerical_rank(sv)) == r
    assert float(spectral.effective_rank(spectral.singular_values(torch.eye(n)))) == pytest.approx(n)
    assert float(spectral.effective_rank(spectral.singular_values(torch.ones(n, n)))) == pytest.approx(1.0)


def test_row_entropy_and_simplex_distance():
    n = 10
    uniform = torch.full((2, n, n), 1.0 / n)
    torch.testing.assert_close(spectral.row_entropy(uniform), torch.full((2, n), math.log(n), dtype=torch.float64))
    assert float(spectral.row_entropy(torch.eye(n)).max()) == pytest.approx(0.0, abs=1e-9)
    assert float(spectral.simplex_distance(torch.randn(4, n).softmax(-1)).max()) == pytest.approx(0.0, abs=1e-7)
    assert float(spectral.simplex_distance(2 * torch.eye(n))[0]) == pytest.approx(1.0)  # (2,0..) -> (1,0..)
    summary = spectral.spectral_summary([uniform.unsqueeze(1)])
    assert summary[0]["row_sum_mean"] == pytest.approx(1.0) and summary[0]["numerical_rank"] == 1.0


# ------------------------------------------------------------------------------------------------ attention
def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(7).expand(2, 3, 7, 7)
    torch.testing.assert_close(attention.attention_rollout([eye, eye, eye]), torch.eye(7).expand(2, 7, 7))
    a = torch.rand(1, 2, 5, 5)
    expected = a.mean(1) / a.mean(1).sum(-1, keepdim=True)
    torch.testing.assert_close(attention.attention_rollout([a], residual=0.0), expected)
    torch.testing.assert_close(attention.attention_rollout([a, a], residual=0.0), expected @ expected)


def test_recorded_attention_is_sigma_for_karat_heads_and_softmax_for_the_rest():
    x = torch.randn(2, 1, 8, 8)
    soft = attention.record_attention(tiny(False), x)
    assert soft.karat_heads == [0, 0] and soft.maps[0].shape == (2, 3, 16, 16)
    torch.testing.assert_close(soft.maps[1].sum(-1), torch.ones(2, 3, 16))
    torch.testing.assert_close(soft.maps[0], soft.logits[0].softmax(-1))
    model = tiny(mixed_head=True, num_attention=2)
    rec = attention.record_attention(model, x)
    assert rec.karat_heads == [2, 2]
    op = model.blocks[0].attn.karat.operator
    torch.testing.assert_close(rec.maps[0][:, :2], op(rec.logits[0][:, :2]))
    torch.testing.assert_close(rec.maps[0][:, 2:], rec.logits[0][:, 2:].softmax(-1))
    assert not model.blocks[0].attn.karat.export_attention and model.blocks[0].attn.karat.last_attention is None


# ------------------------------------------------------------------------------------------------ functions
@pytest.mark.parametrize("cfg", [dict(), dict(basis_type="WaveletBasis", base_fn="nn.SiLU"),
                                 dict(basis_type="SplineBasis", grid=4), dict(basis_type="RationalBasis")])
def test_edge_functions_sum_to_the_layer_output(cfg):
    layer = KANLayer(2, 5, 4, KArAtConfig(**cfg))
    xs = torch.linspace(-1.5, 1.5, 11)
    values = functions.edge_functions(layer, xs)  # (H, in, out, T)
    assert values.shape == (2, 5, 4, 11)
    x = xs.view(1, 1, -1, 1).expand(1, 2, 11, 5)  # every input at the same value
    torch.testing.assert_close(values.sum(1).permute(0, 2, 1), layer(x)[0], atol=1e-5, rtol=1e-5)


def test_fourier_edge_function_is_its_coefficients():
    layer = KANLayer(1, 1, 1, KArAtConfig(grid=2))
    with torch.no_grad():
        layer.basis.coefficients.copy_(torch.tensor([0.5, 0.0, 0.0, -2.0]).view(1, 1, 1, 4))  # cos x, -2 sin 2x
        layer.basis_scale.fill_(3.0)
    xs = torch.linspace(-2, 2, 9)
    torch.testing.assert_close(functions.edge_functions(layer, xs)[0, 0, 0], 3 * (0.5 * xs.cos() - 2 * (2 * xs).sin()))


def test_function_summary_covers_the_logits_the_images_produce():
    model, x = tiny(), torch.randn(3, 1, 8, 8)
    rows = functions.summarise_functions(model, x, points=17, bins=10, quantile=0.0)
    assert [(r["block"], r["head"]) for r in rows] == [(b, h) for b in range(2) for h in range(3)]
    logits = attention.record_attention(model, x).logits
    r = rows[4]  # block 1, head 1
    assert r["range"][0] == pytest.approx(float(logits[1][:, 1].min()), abs=1e-5)
    assert r["range"][1] == pytest.approx(float(logits[1][:, 1].max()), abs=1e-5)
    assert sum(r["hist_counts"]) == 3 * 16 * 16 and r["num_edges"] == 16 * 12 and len(r["mean"]) == 17


# ------------------------------------------------------------------------------------------------ weights
def test_weight_groups_count_every_parameter_once():
    model = tiny(universal=True)
    groups = weights.weight_groups(model)
    op = model.blocks[0].attn.karat.operator
    assert model.blocks[1].attn.karat.operator is op
    assert groups["karat coefficients"].numel() == op.phi.basis.coefficients.numel()
    assert groups["qkv"].numel() == 2 * 24 * 72 and groups["proj"].numel() == 2 * 24 * 24
    stats = weights.describe(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert stats["mean"] == 2.5 and stats["count"] == 4 and sum(stats["hist_counts"]) == 4


# ------------------------------------------------------------------------------------------------ landscape
def test_landscape_centre_is_the_checkpoint_loss_and_weights_are_restored():
    model = tiny()
    batches = [(torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = landscape.mean_loss(model, batches)
    d = landscape.filter_normalised_direction(model, torch.Generator().manual_seed(0))
    curve = landscape.landscape_1d(model, batches, d, [-1.0, 0.0, 1.0], progress=False)
    surface = landscape.landscape_2d(model, batches, d, d, [-0.5, 0.0, 0.5], [0.0, 1.0], progress=False)
    assert curve[1] == pytest.approx(loss, rel=1e-6) and surface[0][1] == pytest.approx(loss, rel=1e-6)
    assert curve[0] != pytest.approx(loss) and surface[1][1] == pytest.approx(curve[2], rel=1e-5)  # 0 d + 1 d
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    w = model.blocks[0].attn.qkv.weight
    torch.testing.assert_close(d["blocks.0.attn.qkv.weight"].norm(dim=1), w.detach().norm(dim=1))
    assert float(d["blocks.0.attn.qkv.bias"].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="odd"):
        landscape.symmetric_grid(4, 1.0)
    assert landscape.symmetric_grid(5, 2.0) == [-2.0, -1.0, 0.0, 1.0, 2.0]


# ------------------------------------------------------------------------------------------------ path
def test_pca_of_collinear_checkpoints_has_one_component():
    centre, v = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    points = torch.stack([centre + t * v for t in (3.0, 2.0, 1.5, 0.5)])
    comps, coords, ratio = path.pca(points, centre)
    assert ratio[0] == pytest.approx(1.0) and float(ratio[1:].sum()) == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(coords[:, 0].abs(), torch.tensor([3.0, 2.0, 1.5, 0.5], dtype=torch.float64) * v.norm())
    torch.testing.assert_close(coords[:, 1], torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0)


def test_path_axis_contains_zero_and_the_trajectory():
    xs = path.axis_range([-3.0, 1.0], 7)
    assert 0.0 in xs and len(xs) == 7 and xs[0] < -3.0 and xs[-1] > 1.0 and xs == sorted(xs)
