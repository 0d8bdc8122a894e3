"""detectron2 ViTDet backbone with KArAt: detectron2's rel-pos bias, padded window keys masked, yacs registry path.
The masks are checked at the small sizes, where ``impl="auto"`` materialises sigma(S), and above
``karat.kernels.REFERENCE_MAX_TOKENS`` keys, where it runs the C++ CPU kernel."""
import pytest
import torch

from conftest import require, require_cpu_kernel
from kernel_calls import assert_kernel_path_matches_reference, cpu_kernel_calls

require("detectron2")
from detectron2.modeling.backbone.utils import add_decomposed_rel_pos, window_partition  # noqa: E402

from detectron2_plugin.backbone import (  # noqa: E402
    KArAtBlock, KArAtViT, KArAtViTAttention, decomposed_rel_pos_bias, padded_window_key_mask)
from karat import KArAtConfig, KArAtOperator  # noqa: E402

SMALL = dict(img_size=32, patch_size=4, embed_dim=24, depth=3, num_heads=2, window_size=3, window_block_indexes=[0, 1],
             use_rel_pos=True, rel_pos_zero_init=False, pretrain_img_size=32, pretrain_use_cls_token=False,
             karat=dict(grid=2, hidden_dim=4))


def test_rel_pos_bias_is_detectron2s():
    q = torch.randn(2, 3, 12, 8)
    rh, rw = torch.randn(5, 8), torch.randn(7, 8)
    ours = decomposed_rel_pos_bias(q, rh, rw, (3, 4), (3, 4))
    theirs = add_decomposed_rel_pos(torch.zeros(6, 12, 12), q.reshape(6, 12, 8), rh, rw, (3, 4), (3, 4))
    torch.testing.assert_close(ours.reshape(6, 12, 12), theirs)


def test_padded_window_mask_follows_window_partition():
    valid = torch.zeros(2, 8, 8, 1)
    valid[:, :6, :7] = 1  # a 6 x 7 map padded to 8 x 8 by window_partition
    windows, pad_hw = window_partition(valid[:, :6, :7], 4)
    assert pad_hw == (8, 8)
    mask = padded_window_key_mask((6, 7), pad_hw, 4, batch=2, device=torch.device("cpu"))
    assert mask.shape == (2 * 4, 1, 1, 16)
    torch.testing.assert_close(mask.view(8, 16), windows.reshape(8, 16) > 0)  # padded zeros are exactly the masked keys
    assert padded_window_key_mask((8, 8), (8, 8), 4, 2, torch.device("cpu")) is None


@pytest.mark.parametrize("side", [4, 6], ids=["16 keys", "36 keys"])
def test_masked_padded_keys_do_not_change_valid_outputs(side):
    """Without a softmax a -inf bias masks nothing: the padded keys must go in as key_mask, and then their content
    cannot reach the valid tokens' outputs. 36 keys run on the C++ kernel."""
    attn = KArAtViTAttention(16, 2, use_rel_pos=True, rel_pos_zero_init=False, input_size=(side, side),
                             karat_cfg=KArAtConfig(grid=2, hidden_dim=4)).eval()
    x = torch.randn(1, side, side, 16)
    mask = torch.ones(side, side, dtype=torch.bool)
    mask[-1] = False  # the last row is padding
    key_mask = mask.view(1, 1, 1, side * side)
    x2 = x.clone()
    x2[:, -1] = torch.randn(side, 16) * 5
    with torch.no_grad(), cpu_kernel_calls() as calls:
        a, b = attn(x, key_mask), attn(x2, key_mask)
        c, d = attn(x), attn(x2)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert (c[:, :-1] - d[:, :-1]).abs().max() > 1e-3  # unmasked, the padded content would leak in
    if side * side > 24:
        require_cpu_kernel()
        assert calls["forward"] == 4, calls  # impl="auto" took the C++ kernel


def test_padded_windows_on_the_cpu_kernel_match_the_reference():
    """Windows of 6 x 6 over an 8 x 8 map: window_partition pads it to 12 x 12, and three of the four windows hold
    padded keys. ``impl="auto"`` runs the C++ kernel with detectron2's rel-pos bias and the padding mask; in float64
    it computes what the reference path computes, gradients included."""
    x = torch.randn(2, 8, 8, 16, dtype=torch.float64)

    def build(impl):
        return KArAtBlock(16, 2, karat_cfg=KArAtConfig(grid=2, hidden_dim=4, impl=impl), window_size=6,
                          use_rel_pos=True, rel_pos_zero_init=False, input_size=(8, 8))

    calls = assert_kernel_path_matches_reference(build, lambda block: block(x))
    assert calls["forward"] == 1


def test_window_blocks_pass_the_padding_mask(monkeypatch):
    block = KArAtBlock(16, 2, karat_cfg=KArAtConfig(grid=2, hidden_dim=4), window_size=4, input_size=(6, 6))
    seen = []
    original = block.attn.forward

    def spy(x, key_mask=None):
        seen.append(key_mask)
        return original(x, key_mask)

    monkeypatch.setattr(block.attn, "forward", spy)
    out = block(torch.randn(2, 6, 6, 16))
    assert out.shape == (2, 6, 6, 16)
    assert seen[0] is not None and seen[0].shape == (2 * 4, 1, 1, 16)
    assert int((~seen[0]).sum()) == 2 * (64 - 36)  # every padded token of every window, nothing else


def test_backbone_windows_and_global_blocks_train():
    net = KArAtViT(**SMALL, drop_path_rate=0.1)
    assert net.block_layouts() == {0: (3, 3), 1: (3, 3), 2: (8, 8)}  # 8 x 8 map: windows of 3 with padding
    ops = [m for m in net.modules() if isinstance(m, KArAtOperator)]
    assert [op.num_tokens for op in ops] == [9, 9, 64]
    out = net(torch.randn(2, 3, 32, 32))["last_feat"]
    assert out.shape == (2, 24, 8, 8)
    out.square().mean().backward()
    assert net.blocks[2].attn.karat.operator.weight.grad.abs().sum() > 0
    assert net.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = KArAtViT(**SMALL)
    ckpt = KArAtViT(**SMALL, use_act_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # same parameter names as without it
    x = torch.randn(2, 3, 32, 32)
    for m in (plain, ckpt):
        m(x)["last_feat"].sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_universal_shares_one_operator_per_token_count():
    net = KArAtViT(**{**SMALL, "karat": dict(grid=2, hidden_dim=4, universal=True), "depth": 4})
    ops = {id(m) for m in net.modules() if isinstance(m, KArAtOperator)}
    assert len(ops) == 2  # one for the windowed blocks, one for the global blocks
    assert net.blocks[0].attn.karat.operator is net.blocks[1].attn.karat.operator


@pytest.mark.parametrize("size", [(320, 320), (192, 256), (256, 384)], ids=["larger", "smaller", "non-square"])
def test_global_blocks_take_any_grid(size):
    """Built for 256 px (a 16 x 16 global grid), the backbone takes other sizes without square padding: windowed
    blocks keep their 4 x 4 windows (the map padded to whole windows as before), the global block's operator is
    resampled to the map's grid, and gradients reach its stored weights."""
    torch.manual_seed(0)
    net = KArAtViT(**{**SMALL, "img_size": 256, "patch_size": 16, "window_size": 4, "pretrain_img_size": 256})
    out = net(torch.randn(1, 3, *size))["last_feat"]
    assert out.shape == (1, 24, size[0] // 16, size[1] // 16)
    out.square().mean().backward()
    glob = net.blocks[2].attn.karat
    assert glob.operator.num_tokens == 256 and glob.operator.weight.grad.abs().sum() > 0
    assert net.blocks[0].attn.karat.operator.num_tokens == 16


def test_global_attention_at_another_grid_is_the_converted_one():
    from karat import TokenLayout
    from karat.resample import resample_operator_state

    cfg = KArAtConfig(grid=2, hidden_dim=4)
    built = KArAtViTAttention(16, 2, input_size=(4, 4), karat_cfg=cfg).double().eval()
    other = KArAtViTAttention(16, 2, input_size=(5, 6), karat_cfg=cfg).double().eval()
    state = built.state_dict()
    op = built.karat.operator
    moved = resample_operator_state(op.state_dict(), op.key_axes(), TokenLayout(0, (4, 4)), TokenLayout(0, (5, 6)))
    state.update({f"karat.operator.{k}": v for k, v in moved.items()})
    other.load_state_dict(state)
    x = torch.randn(2, 5, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(built(x), other(x))


def test_bad_karat_options_are_clear_errors():
    with pytest.raises(ValueError, match="karat_depth"):
        KArAtViT(**{**SMALL, "karat": dict(depth=3)})
    with pytest.raises(ValueError, match="Unknown KArAt option.*gird"):
        KArAtViT(**{**SMALL, "karat": dict(gird=3)})
    with pytest.raises(ValueError, match="basis_type"):
        KArAtViT(**{**SMALL, "karat": dict(basis_type="Nope")})


def test_yacs_backbone_registry_builds_a_model():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.modeling.backbone import SimpleFeaturePyramid, ViT

    from detectron2_plugin import add_karat_config

    cfg = get_cfg()
    add_karat_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_karat_vitdet_backbone"
    cfg.MODEL.VIT.IMG_SIZE = cfg.MODEL.VIT.SQUARE_PAD = 128
    cfg.MODEL.VIT.EMBED_DIM, cfg.MODEL.VIT.DEPTH, cfg.MODEL.VIT.NUM_HEADS = 48, 3, 3
    cfg.MODEL.VIT.WINDOW_SIZE, cfg.MODEL.VIT.WINDOW_BLOCK_INDEXES = 4, [0, 1]
    cfg.MODEL.KARAT.GRID, cfg.MODEL.KARAT.HIDDEN_DIM = 1, 4
    cfg.MODEL.KARAT.BLOCKWISE, cfg.MODEL.KARAT.UNIVERSAL = False, True
    cfg.INPUT.MIN_SIZE_TEST = cfg.INPUT.MAX_SIZE_TEST = 128
    model = build_model(cfg).eval()
    assert isinstance(model.backbone, SimpleFeaturePyramid) and isinstance(model.backbone.net, KArAtViT)
    assert model.backbone.net.karat_cfg.grid == 1 and model.backbone.net.karat_cfg.universal
    assert model.backbone.net.block_layouts()[2] == (8, 8)
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 100, 128), dtype=torch.uint8)}])
    assert "instances" in out[0]
    cfg.MODEL.KARAT.ENABLED = False  # the softmax baseline from the same config: detectron2's own ViT
    assert type(build_model(cfg).backbone.net) is ViT
