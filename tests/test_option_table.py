"""KArAtConfig is the one table of options: a field added to it (here to a subclass swapped in for the test)
reaches the command line, the yacs node, the detectron2 and mmseg backbones and timm's create_model with no
other edit; host names (``depth`` -> ``karat_depth``) are applied in one place; unknown options fail clearly."""
from __future__ import annotations

import dataclasses
import io
import tokenize
from pathlib import Path

import pytest

import karat.config
from conftest import leave_default_scope, require
from karat.config import KArAtConfig, config_from_kwargs, pop_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type:
    """KArAtConfig plus two test-only options, one of them known to hosts by another name (like ``depth``)."""
    cls = dataclasses.make_dataclass("FakeKArAtConfig", [
        ("fake_gain", float, dataclasses.field(default=1.0, metadata=dict(help="a test-only gain"))),
        ("fake_steps", int, dataclasses.field(default=1, metadata=dict(help="a test-only count",
                                                                       host_name="karat_fake_steps"))),
    ], bases=(KArAtConfig,), frozen=True)
    monkeypatch.setattr(karat.config, "KArAtConfig", cls)
    return cls


def _cores(model):
    from karat import KArAtCore

    return [m for m in model.modules() if isinstance(m, KArAtCore)]


def _reached(model, fake: type, gain: float, steps: int) -> None:
    """The model was built with the fake config, and its attention cores hold it."""
    assert isinstance(model.karat_cfg, fake)
    assert (model.karat_cfg.fake_gain, model.karat_cfg.fake_steps) == (gain, steps)
    cores = _cores(model)
    assert cores and all(c.cfg.fake_gain == gain and c.cfg.fake_steps == steps for c in cores)


def test_fake_option_is_a_classification_flag_and_reaches_the_model(fake):
    from classification.args import get_args_parser
    from classification.main import build_model

    parser = get_args_parser()
    assert "--fake_gain" in parser.format_help() and "a test-only gain" in parser.format_help()
    args = parser.parse_args(["--model", "vit_tiny_patch16_224_karat", "--input-size", "32", "--grid", "1",
                              "--hidden_dim", "2", "--model-kwargs", "depth=1", "--fake_gain", "2.5",
                              "--fake_steps", "4"])
    assert (args.fake_gain, args.fake_steps) == (2.5, 4)
    assert karat.config.config_from_namespace(args) == fake(grid=1, hidden_dim=2, fake_gain=2.5, fake_steps=4)
    _reached(build_model(args, 10), fake, 2.5, 4)
    defaults = parser.parse_args([])
    assert (defaults.fake_gain, defaults.fake_steps) == (1.0, 1)


def test_fake_option_reaches_timm_create_model(fake):
    import timm

    model = timm.create_model("vit_tiny_patch16_224_karat", img_size=32, depth=1, grid=1, hidden_dim=2,
                              fake_gain=3.0, karat_fake_steps=2)
    _reached(model, fake, 3.0, 2)
    assert len(model.blocks) == 1  # ``depth`` stayed the host's


def test_fake_option_is_in_the_yacs_node_and_reaches_the_detectron2_backbone(fake):
    require("detectron2")
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY

    from detectron2_plugin import add_karat_config

    cfg = add_karat_config(get_cfg())
    assert (cfg.MODEL.KARAT.FAKE_GAIN, cfg.MODEL.KARAT.KARAT_FAKE_STEPS) == (1.0, 1)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.VIT.IMG_SIZE = cfg.MODEL.VIT.SQUARE_PAD = 32
    cfg.MODEL.VIT.PATCH_SIZE, cfg.MODEL.VIT.EMBED_DIM, cfg.MODEL.VIT.DEPTH, cfg.MODEL.VIT.NUM_HEADS = 8, 16, 2, 2
    cfg.MODEL.VIT.WINDOW_SIZE, cfg.MODEL.VIT.WINDOW_BLOCK_INDEXES = 2, [0]
    cfg.MODEL.VIT.OUT_CHANNELS = 8
    cfg.MODEL.KARAT.GRID, cfg.MODEL.KARAT.HIDDEN_DIM = 1, 2
    cfg.merge_from_list(["MODEL.KARAT.FAKE_GAIN", 0.5, "MODEL.KARAT.KARAT_FAKE_STEPS", 3])
    backbone = BACKBONE_REGISTRY.get("build_karat_vitdet_backbone")(cfg, ShapeSpec(channels=3))
    _reached(backbone.net, fake, 0.5, 3)
    assert karat.config.config_from_yacs(cfg.MODEL.KARAT) == backbone.net.karat_cfg


def test_fake_option_is_a_detectron2_backbone_kwarg(fake):
    require("detectron2")
    from detectron2_plugin.backbone import KArAtViT

    net = KArAtViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, pretrain_img_size=16,
                   pretrain_use_cls_token=False, karat=dict(grid=1, hidden_dim=2, fake_gain=4.0, karat_fake_steps=5))
    _reached(net, fake, 4.0, 5)
    with pytest.raises(ValueError, match="'fake_steps' is ambiguous.*'karat_fake_steps'"):
        KArAtViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, karat=dict(fake_steps=5))


# A runner built earlier in the process leaves its scope current ('mmdet', or 'mmengine' where a config names
# none): the builds name mmseg's scope, so they resolve in mmseg's registry whatever is current.
@pytest.mark.parametrize("ambient", ["mmdet", "mmengine"])
@pytest.mark.parametrize("backbone", ["KArAtVisionTransformer", "KArAtSwinTransformer"])
def test_fake_option_is_an_mmseg_backbone_kwarg(fake, backbone, ambient):
    require("mmseg")
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    import mmseg_configs  # noqa: F401  (registers the backbones, as custom_imports does)

    leave_default_scope(ambient)
    sizes = dict(KArAtVisionTransformer=dict(img_size=(16, 16), patch_size=8, embed_dims=16, num_layers=1,
                                             num_heads=2, out_indices=(0,)),
                 KArAtSwinTransformer=dict(pretrain_img_size=16, embed_dims=16, depths=(1,), num_heads=(2,),
                                           window_size=2, strides=(4,), out_indices=(0,)))[backbone]
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(dict(type=backbone, grid=1, hidden_dim=2, fake_gain=6.0, karat_fake_steps=7, **sizes))
        _reached(model, fake, 6.0, 7)
        with pytest.raises(ValueError, match=f"keyword.*in {backbone}. 'fake_gian': did you mean 'fake_gain'"):
            MODELS.build(dict(type=backbone, fake_gian=6.0, **sizes))  # a typo: not a TypeError inside mmseg
    assert DefaultScope.get_current_instance().scope_name == ambient  # the override is undone


def test_host_names_are_applied_in_one_place():
    cfg = config_from_kwargs(dict(karat_depth=3, modular_attn=False))
    assert cfg.depth == 3
    kwargs = dict(depth=12, karat_depth=4, num_classes=10)
    assert pop_config(kwargs).depth == 4 and kwargs == dict(depth=12, num_classes=10)  # the host keeps its depth
    assert pop_config(dict(karat_cfg=dict(depth=5))).depth == 5  # a recorded config is field-named
    with pytest.raises(ValueError, match="'depth' is ambiguous.*'karat_depth'"):
        pop_config(dict(depth=2), refuse_renamed=True, where="KArAtVisionTransformer")
    # No module outside karat/config.py spells the host name of an option as a string of its own.
    spelled = []
    sources = [p for top in ("karat", "classification", "detectron2_plugin", "mmseg_configs", "tools", "configs")
               for p in sorted((ROOT / top).rglob("*.py"))]
    for path in sources:
        if path == ROOT / "karat/config.py":
            continue
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.STRING and tok.string.strip("'\"").lower() == "karat_depth":
                spelled.append(f"{path.relative_to(ROOT)}:{tok.start[0]}")
    assert not spelled, f"the depth -> karat_depth rename is repeated at {spelled}; use karat.config's functions"


def test_unknown_option_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown KArAt option\(s\) \['gird'\] in here\. 'gird': did you mean "
                                         r"'grid'\? Known KArAt options: \[.*'karat_depth'"):
        config_from_kwargs(dict(gird=3), where="here")
    with pytest.raises(ValueError, match="'hiden_dim': did you mean 'hidden_dim'"):
        pop_config(dict(karat_cfg=dict(hiden_dim=3)))


def test_command_line_keeps_the_paper_flags():
    from classification.args import get_args_parser, karat_kwargs

    args = get_args_parser().parse_args(["--universal", "--depth", "3", "--modular_attn", "False", "--grid_range",
                                         "-2", "2", "--rational_order", "3", "2", "--mixed_head", "--num_attention",
                                         "2", "--basis_type", "SplineBasis"])
    kw = karat_kwargs(args)
    assert kw["universal"] is True and kw["karat_depth"] == 3 and kw["modular_attn"] is False
    assert kw["grid_range"] == (-2.0, 2.0) and kw["rational_order"] == (3, 2) and kw["num_attention"] == 2
    assert "grid" not in karat_kwargs(get_args_parser().parse_args([]))  # the model's own G applies
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--basis_type", "Chebyshev"])


def test_the_readme_options_table_lists_every_option_and_every_choice():
    """README's options table is written for people, so it is checked against the one table: every option under its
    host name, every choice of a choice option in its row, and nothing that is not an option."""
    from karat.options import host_name, option_fields

    text = (ROOT / "README.md").read_text()
    table = text[text.index("| option | default | meaning |"):].split("\n\n", 1)[0].splitlines()[2:]
    rows = {}
    for line in table:
        first = line.split(" | ")[0]
        for name in first.strip("| ").replace("`", "").replace(",", " ").replace("/", " ").split():
            rows[name] = line
    fields = {host_name(f): f for f in option_fields(KArAtConfig)}
    assert rows.keys() == fields.keys(), (sorted(rows.keys() - fields.keys()), sorted(fields.keys() - rows.keys()))
    for name, f in fields.items():
        missing = [c for c in f.metadata.get("choices") or () if f"`{c}`" not in rows[name]]
        assert not missing, f"README's options table: `{name}` does not mention {missing}"
