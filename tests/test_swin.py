"""KArAt Swin: timm's Swin with KArAt window attention, shifted-window masks with KArAt semantics (windows of 16
keys, where ``impl="auto"`` materialises sigma(S), and of 36, where it runs the C++ CPU kernel)."""
import pytest
import timm
import torch

import karat  # noqa: F401
from karat import KArAtConfig
from karat.models import KArAtWindowAttention, is_karat_key
from kernel_calls import assert_kernel_path_matches_reference, cpu_kernel_calls

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


def test_shifted_window_masks_on_the_cpu_kernel():
    """Windows of 36 keys, the default impl="auto": the C++ kernel evaluates the masked window, region-0 queries see
    nothing of region 1, and in float64 the result and its gradients are the reference path's."""
    region = torch.tensor([0] * 15 + [1] * 21)
    mask = torch.where(region[:, None] == region[None, :], 0.0, -100.0)[None].double()
    x = torch.randn(3, 36, 16, dtype=torch.float64)

    def build(impl):
        return KArAtWindowAttention(16, 2, window_size=6, karat_cfg=KArAtConfig(impl=impl))

    assert_kernel_path_matches_reference(build, lambda attn: attn(x, mask))
    attn = build("auto").double()
    x2 = x.clone()
    x2[:, region == 1] += 3 * torch.randn_like(x2[:, region == 1])
    with cpu_kernel_calls() as calls:
        out, out2 = attn(x, mask), attn(x2, mask)
    assert calls["forward"] == 2
    torch.testing.assert_close(out2[:, region == 0], out[:, region == 0])
    assert not torch.allclose(out2[:, region == 1], out[:, region == 1])


def test_swin_on_the_cpu_kernel_matches_the_reference():
    """A whole KArAt Swin with windows of 36 keys (12 x 12 tokens, the second block shifted by 3): every window
    attention on the C++ kernel, and in float64 the logits and gradients are the reference path's."""
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)

    def build(impl):
        return timm.create_model("swin_tiny_patch4_window7_224_karat", img_size=12, patch_size=1, window_size=6,
                                 embed_dim=16, depths=(2,), num_heads=(2,), num_classes=5, impl=impl)

    assert build("auto").layers[0].blocks[1].shift_size == (3, 3)
    calls = assert_kernel_path_matches_reference(build, lambda model: model(x))
    assert calls["forward"] == 2
