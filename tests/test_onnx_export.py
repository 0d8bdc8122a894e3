"""KArAt models leave PyTorch: ``torch.onnx.export`` with the default options, both exporters, ONNX Runtime on the CPU
against PyTorch (issue 21). Tiny models, but with more than ``REFERENCE_MAX_TOKENS`` keys, so that the eager default
path is the C++ kernel's custom op ``karat::fourier_reduce``, which no exporter knows: the model itself must take an
exportable path while ``torch.onnx.export`` runs. The batch axis is dynamic: ONNX Runtime runs two batch sizes. With
``dynamic_img_size=True`` and the dynamo exporter the spatial axes are dynamic too: one graph, several image sizes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Tuple

import pytest
import timm
import torch
from conftest import require, require_cpu_kernel

import karat
from karat.kernels import onnx_export

onnx = require("onnx")
ort = require("onnxruntime")
require("onnxscript")  # the dynamo exporter's translation library

FAMILIES: Dict[str, Tuple[str, dict]] = {  # 65, 49 (two blocks: shifted windows, masked) and 64 keys
    "vit": ("vit_tiny_patch16_224_karat", dict(img_size=32, patch_size=4, embed_dim=16, depth=1, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224_karat",
             dict(img_size=56, patch_size=4, window_size=7, embed_dim=16, depths=(2,), num_heads=(2,))),
    "convit": ("convit_tiny_karat",
               dict(img_size=32, patch_size=4, embed_dim=16, depth=2, num_heads=2, local_up_to_layer=1)),
}


def export(model: torch.nn.Module, x: torch.Tensor, path: Path, dynamo: bool, dynamic_batch: bool = True) -> Path:
    """``torch.onnx.export`` as a user calls it, the batch axis dynamic."""
    if dynamo:
        shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=shapes, verbose=False)
    else:
        axes = {"x": {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes=axes)
    return path


def run_ort(path: Path, x: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: x.numpy()})]


def assert_ort_matches(model: torch.nn.Module, path: Path, *inputs: torch.Tensor) -> None:
    """ONNX Runtime gives PyTorch's outputs (every output, each input: different batch sizes) to 1e-4."""
    for x in inputs:
        with torch.no_grad():
            ref = model(x)
        ref = list(ref.values()) if isinstance(ref, dict) else list(ref) if isinstance(ref, (list, tuple)) else [ref]
        got = run_ort(path, x)
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def tiny(family: str) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **kwargs).eval()


def test_default_path_is_the_custom_op_and_export_leaves_it():
    """The eager default is the C++ kernel; while exporting, the blockwise PyTorch path with fixed key blocks."""
    require_cpu_kernel()
    core = next(m for m in tiny("vit").modules() if isinstance(m, karat.KArAtCore))
    q = torch.randn(2, 2, 65, 8)
    assert core.choose_path(q).detail == "C++ CPU kernel"
    assert not onnx_export.exporting()
    assert onnx_export.block_size(65, 6) == 10 and onnx_export.block_size(4096, 6) == 682


# The dynamo exporter costs 14-21 s a tiny model on two cores: ViT runs in every suite, Swin and ConViT under slow.
CASES = [pytest.param(family, dynamo, id=f"{family}-{'dynamo' if dynamo else 'torchscript'}",
                      marks=[pytest.mark.slow] if dynamo and family != "vit" else [])
         for family in FAMILIES for dynamo in (False, True)]


@pytest.mark.parametrize("family, dynamo", CASES)
def test_timm_family_exports_with_defaults(family, dynamo, tmp_path):
    require_cpu_kernel()
    model = tiny(family)
    size = FAMILIES[family][1]["img_size"]
    path = export(model, torch.randn(2, 3, size, size), tmp_path / "m.onnx", dynamo)
    assert_ort_matches(model, path, torch.randn(2, 3, size, size), torch.randn(3, 3, size, size))


# Fourier (the default: shared features, blockwise key reduction); Shannon wavelets (per-edge, their Hamming window over
# the keys rebuilt for each grid) with a universal operator (one operator reached from two blocks).
DYNAMIC_CASES = {"fourier": {}, "shannon-universal": dict(basis_type="WaveletBasis", wavelet_type="shannon",
                                                          universal=True, depth=2)}


@pytest.mark.parametrize("case", list(DYNAMIC_CASES))
def test_dynamic_img_size_exports_dynamic_spatial_axes(tmp_path, case):
    """One graph from the dynamo exporter, batch, height and width dynamic, evaluates other image sizes as PyTorch
    does: the operator resampled in graph ops from the input's size (antialiased where a side shrinks), not a table
    for the export size. The 8 x 8 grid is evaluated at 6 x 6 (shrinks), 12 x 12 (grows) and 6 x 10 (both)."""
    name, kwargs = FAMILIES["vit"]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, dynamic_img_size=True, **{**kwargs, **DYNAMIC_CASES[case]}).eval()
    x = torch.randn(2, 3, 32, 32)
    grid_h, grid_w = torch.export.Dim("grid_h", min=2, max=64), torch.export.Dim("grid_w", min=2, max=64)
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024), 2: 4 * grid_h, 3: 4 * grid_w},)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=shapes, verbose=False)
    assert_ort_matches(model, path, torch.randn(2, 3, 32, 32), torch.randn(1, 3, 24, 24), torch.randn(2, 3, 48, 48),
                       torch.randn(1, 3, 24, 40))


def _big_tensors(path: Path, n: int, per: int) -> Tuple[int, int]:
    """(number of tensors with at least N x N entries per batch and head, largest entries per batch and head)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = SymbolicShapeInference.infer_shapes(onnx.load(str(path)))  # follows computed Reshape / Expand shapes
    shapes = {i.name: [d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim]
              for i in list(model.graph.value_info) + list(model.graph.output)}
    count, largest = 0, 0
    for name in (o for node in model.graph.node for o in node.output if o):
        dims = shapes.get(name)
        assert dims is not None and all(d >= 0 for d in dims), f"{name}: shape not inferred ({dims})"
        entries = math.prod(dims) // per
        largest = max(largest, entries)
        count += entries >= n * n
    return count, largest


def test_exported_graph_is_as_lean_as_softmax(tmp_path):
    """No tensor of N x N x 2G entries per head, no more N x N ones than timm's softmax ViT exported the same way."""
    name, kwargs = FAMILIES["vit"]
    n, heads, batch = 65, 2, 2
    x = torch.randn(batch, 3, 32, 32)
    karat_path = export(tiny("vit"), x, tmp_path / "karat.onnx", dynamo=False, dynamic_batch=False)
    soft = timm.create_model(name.replace("_karat", ""), num_classes=5, **kwargs).eval()
    soft_path = export(soft, x, tmp_path / "softmax.onnx", dynamo=False, dynamic_batch=False)
    k_count, k_largest = _big_tensors(karat_path, n, batch * heads)
    s_count, _ = _big_tensors(soft_path, n, batch * heads)
    assert k_largest < n * n * 6, "an exported tensor holds the N x N x 2G features"
    assert k_count <= s_count, (k_count, s_count)


@pytest.mark.parametrize("grid", [1, 3, 4, 5, 16])
def test_fourier_planes_span_its_features(grid):
    """What an export records for Fourier (cos, sin times powers of cos up to ``POWER_MAX_GRID``, Chebyshev terms
    above) with ``plane_coefficients`` gives the features' contraction in fp32, masked or not, G = 16 included."""
    torch.manual_seed(0)
    basis = karat.bases.FourierBasis(2, 5, 3, karat.KArAtConfig(grid=grid), 1.0)
    x = torch.randn(4, 2, 7, 5) * 4
    coef = torch.randn(2, 5, 2 * grid, 3)
    keep = (torch.rand(4, 2, 7, 5) > 0.3).float()
    planes_coef, constant = basis.plane_coefficients(coef)
    assert (constant is None) == (grid > basis.POWER_MAX_GRID)
    for mask in (None, keep):
        feats = basis.features(x.double()) * (1 if mask is None else mask.double().unsqueeze(-1))
        want = torch.einsum("bhiqm,hqmr->bhiqr", feats, coef.double())
        planes = basis.feature_planes(x, mask)
        got = sum(p.unsqueeze(-1) * planes_coef[:, None, :, i] for i, p in enumerate(planes))
        if constant is not None:
            got = got + constant[:, None] * (1 if mask is None else mask.unsqueeze(-1))
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4 * want.abs().max().item())


def test_large_grid_exports(tmp_path):
    """G = 16: the Chebyshev recurrence (not the power basis, whose coefficients grow like 2.4^G) in ONNX Runtime."""
    name, kwargs = FAMILIES["vit"]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, grid=16, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    assert_ort_matches(model, export(model, x, tmp_path / "m.onnx", dynamo=False), x)


def test_exported_coefficients_are_stored_once(tmp_path):
    """The exported initializers take no more room than the model's parameters: the key blocks' slices of the
    coefficients (and their power-basis form) are folded into constants, not stored beside the whole tensor."""
    model = tiny("vit")
    path = export(model, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx", dynamo=False)
    stored = sum(math.prod(i.dims) for i in onnx.load(str(path)).graph.initializer)
    assert stored <= sum(p.numel() for p in model.parameters()), stored


# ---------------------------------------------------------------------------------------------------------
# The hosts' backbones: detectron2's KArAtViT, mmseg's KArAtVisionTransformer and KArAtSwinTransformer.

def _detectron2_backbone(config: str) -> torch.nn.Module:
    """``model.backbone.net`` of one of our lazy configs, three blocks deep (two windowed, one global)."""
    require("detectron2")
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(Path(__file__).resolve().parents[1] / config))
    cfg = LazyConfig.apply_overrides(cfg, ["model.backbone.net.depth=3",
                                           "model.backbone.net.window_block_indexes=[0,1]"])
    torch.manual_seed(0)
    return instantiate(cfg.model.backbone.net).eval()


def test_detectron2_shapes_backbone_exports(tmp_path):
    """The shapes recipe's ViT: 16-token windows with detectron2's decomposed rel-pos bias, a 256-token global block."""
    net = _detectron2_backbone("configs/shapes/mask_rcnn_vitdet_karat_t_shapes.py")
    x = torch.randn(2, 3, 32, 32)
    path = export(net, x, tmp_path / "vitdet.onnx", dynamo=False)
    assert_ort_matches(net, path, x, torch.randn(1, 3, 32, 32))


@pytest.mark.slow
def test_detectron2_coco_vitdet_t_backbone_exports(tmp_path):
    """The ViTDet-T COCO config's backbone at 1024 px: 14 x 14 windows (padded, masked keys) and 4,096-token global
    attention, through the dynamo exporter (torch's default)."""
    net = _detectron2_backbone("configs/COCO/mask_rcnn_vitdet_karat_t_100ep.py")
    x = torch.randn(1, 3, 1024, 1024)
    path = export(net, x, tmp_path / "vitdet_t.onnx", dynamo=True, dynamic_batch=False)
    assert_ort_matches(net, path, x)


def test_mmseg_vit_exports(mmseg_backbones, tmp_path):
    torch.manual_seed(0)
    net = mmseg_backbones.KArAtVisionTransformer(
        img_size=(32, 32), patch_size=4, embed_dims=24, num_layers=2, num_heads=2, out_indices=(0, 1),
        final_norm=True)  # 64 keys: the C++ kernel in eager mode
    net.eval()  # mmseg's train() returns None
    x = torch.randn(2, 3, 32, 32)
    assert_ort_matches(net, export(net, x, tmp_path / "vit.onnx", dynamo=False), x, torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("size", [28, 36], ids=["whole windows", "padded"])
def test_mmseg_swin_exports_with_shift_masks(mmseg_backbones, tmp_path, size):
    """Two blocks per stage, so the second shifts its 7 x 7 windows (49 keys) and masks across the shift; 36 px
    pads the 9 x 9 map to 14 x 14."""
    torch.manual_seed(0)
    net = mmseg_backbones.KArAtSwinTransformer(
        pretrain_img_size=size, embed_dims=16, depths=[2], num_heads=[2], window_size=7, strides=(2,), patch_size=2,
        out_indices=(0,))
    net.eval()  # mmseg's train() returns None
    x = torch.randn(2, 3, size, size)
    assert_ort_matches(net, export(net, x, tmp_path / "swin.onnx", dynamo=False), x, torch.randn(1, 3, size, size))
