"""KArAt Swin: timm's Swin with KArAt window attention, shifted-window masks with KArAt semantics."""
import pytest
import timm
import torch

import karat  # noqa: F401
from karat import KArAtConfig
from karat.models import KArAtWindowAttention, is_karat_key

SMALL = dict(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=5)


def test_every_window_attention_is_karat_and_trains():
    model = timm.create_model("swin_tiny_patch4_window7_224_karat", **SMALL)
    attns = [m for m in model.modules() if isinstance(m, KArAtWindowAttention)]
    assert len(attns) == 4 and all(a.karat.num_tokens == 16 for a in attns)
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if is_karat_key(n) and p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(b.shift_size != (0, 0) for stage in model.layers for b in stage.blocks)  # masks were exercised


def test_softmax_swin_weights_load_with_only_karat_missing():
    softmax = timm.create_model("swin_tiny_patch4_window7_224", **SMALL)
    kar = timm.create_model("swin_tiny_patch4_window7_224_karat", **SMALL)
    result = kar.load_state_dict(softmax.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert all(is_karat_key(k) for k in result.missing_keys)


@pytest.mark.parametrize("impl", ["reference", "efficient"])
@pytest.mark.parametrize("mode", ["phi1_w2", "w1_phi2"])
def test_shifted_window_mask_changing_masked_keys_changes_nothing(impl, mode):
    attn = KArAtWindowAttention(16, 2, window_size=4, karat_cfg=KArAtConfig(impl=impl, modular_mode=mode)).double()
    # one window, tokens in two regions (as a shifted window straddling an image border): -100 across regions
    region = torch.tensor([0] * 6 + [1] * 10)
    mask = torch.where(region[:, None] == region[None, :], 0.0, -100.0)[None].double()
    x = torch.randn(3, 16, 16, dtype=torch.float64)  # batch of 3 images, one window each
    out = attn(x, mask)
    x2 = x.clone()
    x2[:, region == 1] += 3 * torch.randn_like(x2[:, region == 1])  # change everything about region-1 tokens
    out2 = attn(x2, mask)
    torch.testing.assert_close(out2[:, region == 0], out[:, region == 0])  # region-0 queries see none of them
    assert not torch.allclose(out2[:, region == 1], out[:, region == 1])
    assert not torch.allclose(attn(x, None)[:, region == 0], out[:, region == 0])  # the mask does something
