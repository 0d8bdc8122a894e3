"""KArAt backbones in mmseg / mmdet: every config builds, Swin mask semantics, weight loading and its reports,
and clear errors for bad input. The masks are checked at the small sizes, where ``impl="auto"`` materialises
sigma(S), and above ``karat.kernels.REFERENCE_MAX_TOKENS`` keys, where it runs the C++ CPU kernel."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import require_cpu_kernel
from kernel_calls import assert_kernel_path_matches_reference, cpu_kernel_calls

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "mmseg_configs" / "upernet").glob("*.py"))
KARAT_OPTS = dict(basis_type="FourierBasis", grid=2, hidden_dim=4)


def small_vit(mmseg_backbones, **kw):
    args = dict(img_size=(32, 32), patch_size=8, embed_dims=48, num_layers=2, num_heads=3, out_indices=(0, 1),
                patch_bias=True, final_norm=True, **KARAT_OPTS)
    args.update(kw)
    return mmseg_backbones.KArAtVisionTransformer(**args)


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_builds(mmseg_backbones, path):
    from mmengine.config import Config
    from mmseg.registry import MODELS

    cfg = Config.fromfile(str(path))
    if "80k" in path.name:  # the 80k configs change the schedule only: same model as their 160k config
        assert cfg.model == Config.fromfile(str(path).replace("80k", "160k")).model
        assert cfg.train_cfg.max_iters == 80000 and cfg.param_scheduler[-1].end == 80000
        return
    assert cfg.model["_scope_"] == "mmseg"  # the config's default_scope: the build cannot take a leftover one
    model = MODELS.build(cfg.model)
    karat = "karat" in path.name
    assert ("KArAt" in type(model.backbone).__name__) == karat
    assert any(".karat.operator." in k for k in model.state_dict()) == karat
    if karat and "vit" in path.name and "embedded" not in path.name:
        assert model.backbone.num_tokens == 32 * 32 + 1  # 512 px, patch 16, class token
    assert cfg.train_dataloader.dataset.type == "CheckedADE20KDataset"
    assert cfg.train_cfg.max_iters == (160000 if "160k" in path.name else 60)


def test_registered_in_mmseg_and_mmdet(mmseg_backbones):
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG

    for name in ("KArAtVisionTransformer", "KArAtSwinTransformer"):
        assert SEG.get(name) is DET.get(name) is getattr(mmseg_backbones, name)
    assert DET.get("SimpleFeaturePyramid") is not None


def test_vit_keeps_mmseg_names_and_pads_small_inputs(mmseg_backbones):
    from mmseg.models.backbones import VisionTransformer

    model = small_vit(mmseg_backbones)
    softmax = VisionTransformer(img_size=(32, 32), patch_size=8, embed_dims=48, num_layers=2, num_heads=3,
                                patch_bias=True, final_norm=True)
    names = set(model.state_dict())
    assert set(softmax.state_dict()) == {k for k in names if ".karat." not in k}
    assert "layers.0.attn.karat.operator.weight" in names and model.num_tokens == 17
    out = model(torch.randn(2, 3, 32, 32))
    assert [o.shape for o in out] == [torch.Size([2, 48, 4, 4])] * 2
    small = model(torch.randn(2, 3, 20, 27))  # padded to 32 x 32, padded keys masked, outputs cropped
    assert [o.shape for o in small] == [torch.Size([2, 48, 3, 4])] * 2


@pytest.mark.parametrize("size,grid,resampled", [((256, 256), (16, 16), True), ((112, 224), (7, 14), False),
                                                  ((112, 320), (7, 20), True)], ids=["larger", "smaller", "mixed"])
def test_vit_takes_every_input_size(mmseg_backbones, monkeypatch, size, grid, resampled):
    """Built for 224 px: a smaller input is padded and masked as before (the stored operators, untouched); a
    larger one in any direction is padded to at least 224 px and evaluated with the operators resampled to its
    grid, once per layer and size outside training; training there reaches the stored weights."""
    import karat.resample as resample_mod

    model = small_vit(mmseg_backbones, img_size=(224, 224), patch_size=16, embed_dims=24, num_heads=2)
    calls = []
    real = resample_mod.resample_operator_state
    monkeypatch.setattr(resample_mod, "resample_operator_state", lambda *a: calls.append(a[3]) or real(*a))
    model.eval()
    with torch.no_grad():
        outs = [model(torch.randn(1, 3, *size)) for _ in range(2)]
    assert [o.shape[-2:] for o in outs[0]] == [grid] * 2
    assert len(calls) == (2 if resampled else 0)  # two layers (blockwise), the second forward from the cache
    model.train()
    model(torch.randn(2, 3, *size))[-1].square().mean().backward()
    grad = model.layers[0].attn.karat.operator.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_vit_whole_inference_in_an_encoder_decoder(mmseg_backbones):
    """mmseg's own EncoderDecoder with test_cfg mode='whole' on images larger than img_size, not square."""
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    backbone = dict(type="KArAtVisionTransformer", img_size=(32, 32), patch_size=8, embed_dims=24, num_layers=2,
                    num_heads=2, out_indices=(1,), **KARAT_OPTS)
    head = dict(type="FCNHead", in_channels=24, channels=8, num_convs=1, num_classes=3, in_index=0,
                norm_cfg=dict(type="BN"), align_corners=False, loss_decode=dict(type="CrossEntropyLoss"))
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(dict(type="EncoderDecoder", backbone=backbone, decode_head=head,
                                  data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3),
                                  test_cfg=ConfigDict(mode="whole"))).eval()
    for h, w in ((40, 56), (64, 36)):
        meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), padding_size=[0, 0, 0, 0])
        with torch.no_grad():
            pred = model.predict(torch.randn(1, 3, h, w), [SegDataSample(metainfo=meta)])
        assert pred[0].pred_sem_seg.data.shape == (1, h, w)


# (img_size, input size): a 4 x 4 grid with 3 x 3 valid patches (16 keys, sigma(S) materialised), a 6 x 6 grid
# with 5 x 5 valid (36 keys: the C++ kernel)
PADDED_VIT = {"16 keys": (32, 24), "36 keys": (48, 40)}


@pytest.mark.parametrize("size", PADDED_VIT)
def test_vit_padding_masks_padded_keys(mmseg_backbones, size):
    """Valid tokens do not see the padding: what the padded area holds changes nothing."""
    img, inp = PADDED_VIT[size]
    grid, valid = img // 8, math.ceil(inp / 8)
    model = small_vit(mmseg_backbones, img_size=(img, img), with_cls_token=False)
    model.eval()  # mmseg's train() returns None
    x = torch.randn(1, 3, inp, inp)
    with cpu_kernel_calls() as calls:
        base = model(x)[-1]
        mask = model._padding_key_mask((grid, grid), (valid, valid), x.device)
        assert mask.sum() == valid ** 2 and mask.shape[-1] == grid ** 2
        # the same image embedded in a full-size input with garbage around it, but the garbage keys masked
        big = torch.randn(1, 3, img, img)
        big[..., :inp, :inp] = x
        tokens = model.patch_embed(big)[0]
        tokens = tokens + model.pos_embed[:, 1:]
        for layer in model.layers:
            tokens = model._run_layer(layer, tokens, mask)
        tokens = model.norm1(tokens)
    kept = tokens.reshape(1, grid, grid, 48)[:, :valid, :valid].permute(0, 3, 1, 2)
    torch.testing.assert_close(kept, base, atol=1e-5, rtol=1e-5)
    if grid ** 2 > 24:
        require_cpu_kernel()
        assert calls["forward"] == 2 * len(model.layers), calls  # impl="auto" took the C++ kernel


def test_vit_padding_mask_on_the_cpu_kernel_matches_the_reference(mmseg_backbones):
    """At 37 keys (6 x 6 patches and the class token) ``impl="auto"`` runs the C++ kernel with the padding mask; in
    float64 it computes what the reference path (sigma(S) materialised, then masked) computes, gradients included."""
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64)  # 5 x 5 valid patches (the last ones partly padded)

    def build(impl):
        return small_vit(mmseg_backbones, img_size=(48, 48), impl=impl)

    def run(model):
        assert model._padding_key_mask((6, 6), (5, 5), x.device).sum() == 26  # the class token and 25 patches kept
        return torch.cat([o.flatten() for o in model(x)])

    assert_kernel_path_matches_reference(build, run)


def test_vit_matches_timm_karat_vit_after_conversion(mmseg_backbones):
    """The converted mmseg KArAt ViT computes what the timm KArAt ViT computes (names, q/k/v split, norms)."""
    import timm

    import karat  # noqa: F401
    from mmseg_configs.convert import fit_vit_state

    tm = timm.create_model("vit_tiny_patch16_224_karat", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                           num_classes=0, **KARAT_OPTS).eval()
    model = small_vit(mmseg_backbones, out_indices=(1,), norm_cfg=dict(type="LN", eps=1e-6))  # timm's eps
    model.eval()
    state, report = fit_vit_state(tm.state_dict(), model)
    assert report.new == [] and report.resampled == []
    model.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    ref = tm.forward_features(x)[:, 1:].reshape(2, 4, 4, 48).permute(0, 3, 1, 2)
    torch.testing.assert_close(model(x)[0], ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
def small_swin(mmseg_backbones, **kw):
    args = dict(pretrain_img_size=32, embed_dims=24, depths=[2, 2], num_heads=[3, 3], window_size=3, strides=(4, 2),
                out_indices=(0, 1), **KARAT_OPTS)
    args.update(kw)
    return mmseg_backbones.KArAtSwinTransformer(**args)


@pytest.mark.parametrize("window", [3, 5], ids=["9 keys", "25 keys"])
def test_swin_masked_keys_change_nothing(mmseg_backbones, window):
    """Spec section 5: in a shifted window with padding, a query's output does not depend on the keys masked for it
    (other shifted-window regions, padding); changing an unmasked key does change it. Windows of 25 keys run on the
    C++ kernel."""
    swin = small_swin(mmseg_backbones, window_size=window)
    swin.eval()
    attn = swin.stages[0].blocks[1].attn  # shifted block
    assert attn.shift_size > 0
    H, W = 7, 8  # not multiples of the window: padded, and shifted
    keep = attn.window_keep_mask((H, W), batch=1, device=torch.device("cpu"))
    assert keep is not None and (~keep).any()
    n = attn.window_size ** 2
    windows = torch.randn(keep.shape[0], n, 24)
    checked = 0
    with cpu_kernel_calls() as calls:
        out = attn.w_msa(windows, key_mask=keep)
        for w in range(keep.shape[0]):
            for i in range(n):
                masked = ~keep[w, 0, i]
                if not masked.any() or masked[i] or keep[w, 0, i].sum() < 2:
                    continue
                changed = windows.clone()
                changed[w, masked] = torch.randn(int(masked.sum()), 24) * 10
                torch.testing.assert_close(attn.w_msa(changed, key_mask=keep)[w, i], out[w, i], atol=1e-5, rtol=1e-5)
                visible = keep[w, 0, i].nonzero().flatten()
                other = visible[visible != i][0]
                changed[w, other] += 5.0
                assert not torch.allclose(attn.w_msa(changed, key_mask=keep)[w, i], out[w, i], atol=1e-4)
                checked += 1
    assert checked > 10
    if n > 24:
        require_cpu_kernel()
        assert calls["forward"] == 1 + 2 * checked, calls  # every call on the C++ kernel (impl="auto")


@pytest.mark.parametrize("window", [3, 5], ids=["9 keys", "25 keys"])
def test_swin_padding_content_changes_nothing(mmseg_backbones, window):
    """The whole shifted-window attention: the valid area's output is the same whatever the padding holds."""
    swin = small_swin(mmseg_backbones, window_size=window)
    swin.eval()
    attn = swin.stages[0].blocks[1].attn
    H, W, ws = 7, 8, attn.window_size
    x = torch.randn(2, H * W, 24)
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    padded = torch.randn(2, Hp, Wp, 24) * 10
    padded[:, :H, :W] = x.view(2, H, W, 24)
    with cpu_kernel_calls() as calls:
        ref = attn(x, (H, W))
        shifted = torch.roll(padded, (-attn.shift_size, -attn.shift_size), (1, 2))
        windows = attn.window_partition(shifted).view(-1, ws * ws, 24)
        out = attn.w_msa(windows, key_mask=attn.window_keep_mask((H, W), 2, x.device)).view(-1, ws, ws, 24)
    out = torch.roll(attn.window_reverse(out, Hp, Wp), (attn.shift_size, attn.shift_size), (1, 2))
    torch.testing.assert_close(out[:, :H, :W].reshape(2, H * W, 24), ref, atol=1e-5, rtol=1e-5)
    if ws * ws > 24:
        require_cpu_kernel()
        assert calls["forward"] == 2, calls


def test_swin_masks_on_the_cpu_kernel_match_the_reference(mmseg_backbones):
    """Windows of 25 keys: ``impl="auto"`` runs the C++ kernel with the relative-position bias and the shifted-window
    and padding masks; in float64 it computes what the reference path computes, gradients included."""
    x = torch.randn(2, 3, 40, 44, dtype=torch.float64)  # maps of 10 x 11 (padded to 10 x 15) and 5 x 6

    def build(impl):
        return small_swin(mmseg_backbones, window_size=5, impl=impl)

    def run(model):
        return torch.cat([o.flatten() for o in model(x)])

    calls = assert_kernel_path_matches_reference(build, run)
    assert calls["forward"] == 4  # every block of both stages


def test_swin_forward_backward_and_softmax_checkpoint(mmseg_backbones, tmp_path):
    from mmseg.models.backbones import SwinTransformer

    swin = small_swin(mmseg_backbones)
    outs = swin(torch.randn(2, 3, 40, 44))
    assert [o.shape for o in outs] == [torch.Size([2, 24, 10, 11]), torch.Size([2, 48, 5, 6])]
    sum(o.sum() for o in outs).backward()
    assert swin.stages[0].blocks[1].attn.w_msa.karat.operator.weight.grad is not None
    softmax = SwinTransformer(pretrain_img_size=32, embed_dims=24, depths=[2, 2], num_heads=[3, 3], window_size=3,
                              strides=(4, 2), out_indices=(0, 1))
    path = tmp_path / "swin_softmax.pth"
    torch.save(dict(state_dict={f"backbone.{k}": v for k, v in softmax.state_dict().items()}), path)
    loaded = small_swin(mmseg_backbones, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    loaded.init_weights()
    assert loaded.load_report.new and all(".karat." in k for k in loaded.load_report.new)
    torch.testing.assert_close(loaded.stages[0].blocks[0].attn.w_msa.qkv.weight,
                               softmax.stages[0].blocks[0].attn.w_msa.qkv.weight)


# ---------------------------------------------------------------------------------------------------------
def test_load_reports(mmseg_backbones, tmp_path):
    """A softmax timm / mmseg ViT leaves only KArAt tensors new; a KArAt checkpoint leaves none."""
    import timm

    from mmseg.models.backbones import VisionTransformer

    timm_vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                 num_classes=10)
    torch.save(timm_vit.state_dict(), tmp_path / "timm.pth")
    mmseg_vit = VisionTransformer(img_size=(32, 32), patch_size=8, embed_dims=48, num_layers=2, num_heads=3,
                                  patch_bias=True, final_norm=True)
    torch.save(dict(state_dict=mmseg_vit.state_dict()), tmp_path / "mmseg.pth")
    for name in ("timm.pth", "mmseg.pth"):
        model = small_vit(mmseg_backbones, init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / name)))
        model.init_weights()
        report = model.load_report
        assert report.new and all(".karat.operator." in k for k in report.new), (name, report.new)
        assert report.missing_non_karat == []
    karat_vit = small_vit(mmseg_backbones)
    torch.save(dict(state_dict={f"backbone.{k}": v for k, v in karat_vit.state_dict().items()}), tmp_path / "k.pth")
    model = small_vit(mmseg_backbones, init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "k.pth")))
    model.init_weights()
    assert model.load_report.new == []
    torch.testing.assert_close(model.layers[1].attn.karat.operator.weight,
                               karat_vit.layers[1].attn.karat.operator.weight)


def test_karat_weights_resampled_to_larger_grid(mmseg_backbones, tmp_path):
    karat_vit = small_vit(mmseg_backbones)
    torch.save(dict(state_dict=karat_vit.state_dict()), tmp_path / "k.pth")
    big = small_vit(mmseg_backbones, img_size=(64, 64),
                    init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "k.pth")))
    big.init_weights()
    assert big.num_tokens == 65
    assert "layers.0.attn.karat.operator.weight" in big.load_report.resampled and big.load_report.new == []
    assert big.layers[0].attn.karat.operator.weight.shape[1] == 65


def test_bad_checkpoints_fail_clearly(mmseg_backbones, tmp_path):
    from mmseg_configs.convert import fit_vit_state

    model = small_vit(mmseg_backbones)
    other = small_vit(mmseg_backbones, embed_dims=96)  # another width
    with pytest.raises(ValueError, match="do not fit"):
        fit_vit_state(other.state_dict(), model)
    deeper = small_vit(mmseg_backbones, num_layers=3, out_indices=(2,))
    with pytest.raises(ValueError, match="another architecture"):
        fit_vit_state(deeper.state_dict(), model)
    swin = small_swin(mmseg_backbones)
    with pytest.raises(ValueError, match="another architecture"):
        fit_vit_state(swin.state_dict(), model)
    state = model.state_dict()
    state = {k: (v[:, :11] if ".karat.operator." in k else v) for k, v in state.items()}  # 11 keys: no grid
    with pytest.raises(ValueError, match="cannot be resampled"):
        fit_vit_state(state, small_vit(mmseg_backbones))
    no_cls = small_vit(mmseg_backbones, with_cls_token=False)
    with pytest.raises(ValueError, match="class token"):
        fit_vit_state(no_cls.state_dict(), small_vit(mmseg_backbones, img_size=(64, 64)))


def test_bad_options_fail_clearly(mmseg_backbones):
    with pytest.raises(ValueError, match="basis_type"):
        small_vit(mmseg_backbones, basis_type="Nope")
    with pytest.raises(ValueError, match="karat_depth"):
        small_vit(mmseg_backbones, depth=2)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        small_vit(mmseg_backbones, img_size=(30, 30))
