"""Spec section 6: KArAt weights moved to another token count keep the operator's function."""
import math

import pytest
import timm
import torch

import karat  # noqa: F401
from karat import KArAtConfig, KArAtCore, save_checkpoint
from karat.resample import TokenLayout, resample_karat_state_dict, resample_operator_state


def _smooth(grid, freqs, amps):
    """Values of a smooth function of position at the centres of an h x w grid: (len(amps), h*w)."""
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    out = 0
    for (fy, fx), a in zip(freqs, amps.unbind(-1)):
        out = out + a[:, None] * torch.cos(math.pi * (fy * yy + fx * xx)).reshape(1, -1)
    return out


FREQS = [(0, 0), (1, 0), (0, 1), (1, 1)]


def _tokens(layout, dim, gen):
    amps = torch.randn(dim, len(FREQS), generator=gen, dtype=torch.float64)
    grid = _smooth(layout.grid, FREQS, amps).T  # (h*w, dim)
    prefix = torch.randn(layout.prefix, dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return torch.cat([prefix, grid])


def _smooth_operator(core: KArAtCore, layout: TokenLayout) -> None:
    """Give every key-indexed parameter a smooth profile over the key grid (trained weights are smooth-ish)."""
    gen = torch.Generator().manual_seed(1)
    params = dict(core.operator.named_parameters())
    for name, dims in core.operator.key_axes().items():
        moved = params[name].data.movedim(dims[0], -1)  # a view: writing it writes the parameter
        shape = moved.shape[:-1]
        amps = torch.randn(math.prod(shape), len(FREQS), generator=gen, dtype=torch.float64)
        profile = _smooth(layout.grid, FREQS, amps).reshape(*shape, -1) / 2
        if name.endswith("basis_scale"):
            moved[..., layout.prefix:] = 1 + 0.2 * profile
        else:
            moved[..., layout.prefix:] = moved[..., layout.prefix:].std() * profile


def _cls_output(core, layout, wq, wk, wv):
    x = _tokens(layout, 8, torch.Generator().manual_seed(3))
    q, k, v = ((x @ w).reshape(1, -1, 2, 4).transpose(1, 2) for w in (wq, wk, wv))
    return core(q, k, v)[:, :, 0]  # class-token query: a sum over every key


@pytest.mark.parametrize("mode", [dict(modular_mode="phi1_w2"), dict(modular_mode="w1_phi2"),
                                  dict(modular_attn=False, depth=2)], ids=["phi1_w2", "w1_phi2", "depth2"])
@pytest.mark.parametrize("new_grid", [(16, 16), (6, 6)], ids=["up", "down"])
def test_resampled_operator_keeps_its_output(mode, new_grid):
    src, dst = TokenLayout(1, (8, 8)), TokenLayout(1, new_grid)
    cfg = KArAtConfig(hidden_dim=4, grid=2, **mode)
    old = KArAtCore(2, src.num_tokens, cfg).double().eval()
    _smooth_operator(old, src)
    new = KArAtCore(2, dst.num_tokens, cfg).double().eval()
    state = resample_operator_state(old.operator.state_dict(), old.operator.key_axes(), src, dst)
    new.operator.load_state_dict(state)
    gen = torch.Generator().manual_seed(5)
    wq, wk, wv = (torch.randn(8, 8, generator=gen, dtype=torch.float64) / 8 for _ in range(3))
    before, after = _cls_output(old, src, wq, wk, wv), _cls_output(new, dst, wq, wk, wv)
    rel = (after - before).norm() / before.norm()
    assert rel < 0.05, f"relative change of the class-token output {rel:.3f}"  # the stated tolerance: 5%


def test_prefix_tokens_are_kept_or_dropped():
    t = torch.arange(1 + 4).double()[None, :]  # class token + 2x2 grid
    kept = karat.resample.resample_key_axis(t, 1, TokenLayout(1, (2, 2)), TokenLayout(1, (2, 2)), rescale=True)
    torch.testing.assert_close(kept, t)
    dropped = karat.resample.resample_key_axis(t, 1, TokenLayout(1, (2, 2)), TokenLayout(0, (2, 2)), rescale=True)
    torch.testing.assert_close(dropped, t[:, 1:])
    with pytest.raises(ValueError, match="Cannot create prefix tokens"):
        karat.resample.resample_key_axis(t[:, 1:], 1, TokenLayout(0, (2, 2)), TokenLayout(1, (2, 2)), rescale=True)


def test_a_token_count_that_is_not_a_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="198 tokens with 1 prefix token.*not a square grid"):
        TokenLayout.infer(198, 1)


def test_timm_checkpoint_at_another_image_size(tmp_path):
    small = dict(patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5)
    src_model = timm.create_model("vit_tiny_patch16_224_karat", img_size=32, **small)  # 1 + 4x4 tokens
    path = save_checkpoint(src_model.state_dict(), tmp_path / "karat32.pth")
    model = timm.create_model("vit_tiny_patch16_224_karat", img_size=64, pretrained=True,  # 1 + 8x8 tokens
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **small)
    w = model.blocks[0].attn.karat.operator.weight
    assert w.shape[1] == 65
    # the class-token key keeps its weight; the grid part is resampled and rescaled by 16 / 64
    torch.testing.assert_close(w[:, 0], src_model.blocks[0].attn.karat.operator.weight[:, 0])
    sd, report = resample_karat_state_dict(src_model.state_dict(), model, TokenLayout(1, (8, 8)))
    assert len(report.resampled) == 2 * 3 and "from 17 tokens" in str(report)  # weight, w_s, coefficients
