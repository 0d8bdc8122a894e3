"""KArAt ConViT: KArAt in GPSA's content attention and in the later blocks' attention."""
import timm
import torch

import karat  # noqa: F401
from karat.models import KArAtGPSA, KArAtMHSA, is_karat_key

SMALL = dict(img_size=32, patch_size=8, embed_dim=8, num_heads=2, depth=3, local_up_to_layer=2, num_classes=5)


def test_gpsa_and_mhsa_blocks_use_karat_and_train():
    model = timm.create_model("convit_tiny_karat", **SMALL)
    kinds = [type(b.attn) for b in model.blocks]
    assert kinds == [KArAtGPSA, KArAtGPSA, KArAtMHSA]
    assert [b.attn.karat.num_tokens for b in model.blocks] == [16, 16, 17]  # class token joins after GPSA
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if is_karat_key(n) and p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert model.blocks[0].attn.gating_param.grad is not None  # the positional gate still learns


def test_gpsa_mixes_karat_content_with_the_positional_score():
    model = timm.create_model("convit_tiny_karat", **SMALL).eval()
    gpsa = model.blocks[0].attn
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        gpsa.gating_param.fill_(50.0)  # gate ~1: pure positional attention, no content at all
        pure_pos = gpsa(x)
        # positional attention ignores content, so the output is linear in x through v (fresh biases are 0)
        torch.testing.assert_close(gpsa(2 * x), 2 * pure_pos, atol=1e-5, rtol=1e-4)
        gpsa.gating_param.fill_(0.0)  # half content: now KArAt makes it non-linear
        assert not torch.allclose(gpsa(2 * x), 2 * gpsa(x), atol=1e-4)


def test_softmax_convit_weights_load_with_only_karat_missing():
    softmax = timm.create_model("convit_tiny", **SMALL)
    kar = timm.create_model("convit_tiny_karat", **SMALL)
    result = kar.load_state_dict(softmax.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert all(is_karat_key(k) for k in result.missing_keys)
