import timm
import torch

import karat  # noqa: F401
from classification.attention_maps import attention_maps

SMALL = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, num_classes=5)


def test_softmax_maps_are_row_stochastic_and_karat_maps_are_sigma():
    x = torch.randn(2, 3, 16, 16)
    soft = attention_maps(timm.create_model("vit_tiny_patch16_224", **SMALL), x)
    assert len(soft) == 2 and soft[0].shape == (2, 3, 17, 17)
    torch.testing.assert_close(soft[1].sum(-1), torch.ones(2, 3, 17))
    model = timm.create_model("vit_tiny_patch16_224_karat", **SMALL)
    impl = model.blocks[0].attn.karat.resolve_impl()
    maps = attention_maps(model, x)
    assert len(maps) == 2 and maps[0].shape == (2, 3, 17, 17)
    assert not torch.allclose(maps[0].sum(-1), torch.ones(2, 3, 17))  # KArAt rows are not normalised
    # the export leaves the model as it was: same path, nothing kept
    assert all(not b.attn.karat.export_attention and b.attn.karat.last_attention is None for b in model.blocks)
    assert model.blocks[0].attn.karat.resolve_impl() == impl
