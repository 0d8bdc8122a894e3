import pytest
import timm

from karat import KArAtConfig


@pytest.mark.parametrize("kwargs, option", [
    (dict(basis_type="ChebyshevBasis"), "basis_type"),
    (dict(wavelet_type="haar"), "wavelet_type"),
    (dict(grid=0), "grid"),
    (dict(grid=2.5), "grid"),
    (dict(hidden_dim=0), "hidden_dim"),
    (dict(depth=0), "depth"),
    (dict(order=-1), "order"),
    (dict(universal=True, blockwise=True), "universal"),
    (dict(rational_order=(5, -1)), "rational_order"),
    (dict(rational_order=(5,)), "rational_order"),
    (dict(grid_range=(1.0, -1.0)), "grid_range"),
    (dict(modular_mode="w2_phi1"), "modular_mode"),
    (dict(base_fn="nn.NotAnActivation"), "base_fn"),
    (dict(base_fn="nn.Linear"), "base_fn"),
    (dict(num_attention=0, mixed_head=True), "num_attention"),
    (dict(impl="cuda-magic"), "impl"),
])
def test_bad_option_names_option_and_value(kwargs, option):
    with pytest.raises(ValueError) as err:
        KArAtConfig(**kwargs)
    msg = str(err.value)
    assert f"{option}=" in msg and "invalid" in msg


def test_num_attention_cannot_exceed_heads():
    with pytest.raises(ValueError, match=r"num_attention=4 .*number of heads \(3\)"):
        timm.create_model("vit_tiny_patch16_224_karat", mixed_head=True, num_attention=4, depth=1)


def test_unknown_basis_through_create_model_is_clear():
    with pytest.raises(ValueError, match="basis_type='Chebyshev'.*FourierBasis"):
        timm.create_model("vit_tiny_patch16_224_karat", basis_type="Chebyshev")


@pytest.mark.parametrize("name", ["ZeroModule", "nn.SiLU", "SiLU", "torch.nn.GELU", "nn.Identity"])
def test_base_fn_names(name):
    KArAtConfig(base_fn=name)


def test_lists_are_normalised_and_config_is_hashable():
    cfg = KArAtConfig(grid_range=[-2, 2], rational_order=[3, 2])
    assert cfg.grid_range == (-2.0, 2.0) and cfg.rational_order == (3, 2)
    hash(cfg)


def test_pop_from_takes_only_karat_options():
    kwargs = dict(grid=5, num_classes=10, depth=4, karat_depth=3, karat_cfg=dict(hidden_dim=8))
    cfg = KArAtConfig.pop_from(kwargs)
    assert (cfg.grid, cfg.hidden_dim, cfg.depth) == (5, 8, 3) and kwargs == dict(num_classes=10, depth=4)
