"""The hosts' own FLOP counters agree with ``karat.flops`` (``tools/flops.py``) on KArAt backbones, whichever impl
serves the attention: fvcore as detectron2's ``tools/analyze_model.py --tasks flop`` runs it, and mmengine as mmseg's
``tools/analysis_tools/get_flops.py`` runs it (the same library calls; the scripts themselves are not vendored).

Without the handles, fvcore counted ``prim::PythonOp._ReduceKeysFromQK``, ``aten::cos`` and ``aten::sin`` as zero.
"""
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from karat import KArAtConfig
from karat.flops import count_flops

from conftest import leave_default_scope, require, require_triton

ROOT = Path(__file__).resolve().parents[1]
MMSEG_EMBEDDED = ROOT / "mmseg_configs" / "upernet" / "upernet_vit-t2-karat_1xb8-60iter_embedded-16x16.py"
KARAT_NAMES = ("PythonOp", "KArAt", "ReduceKeys", "Fused", "aten::cos", "aten::sin", "einsum")


def _no_karat_op_unsupported(unsupported) -> None:
    bad = {op: n for op, n in unsupported.items() if any(s in op for s in KARAT_NAMES)}
    assert not bad, f"KArAt ops the counter could not count: {bad}"


ATTEND = """
import torch
from karat import KArAtCore


class Attend(torch.nn.Module):
    # A host in miniature: q, k, v from one input (B, N, 3 * H * d), one KArAt core.
    def __init__(self, cfg, heads=2, tokens=16):
        super().__init__()
        self.heads, self.core = heads, KArAtCore(heads, tokens, cfg)

    def forward(self, x):
        q, k, v = x.reshape(x.shape[0], x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.core(q, k, v)
"""


def _expected(heads: int, karat_heads: int, n: int, d: int, r: int, grid: int) -> int:
    """The paper's convention by hand: q k^T and sigma V, N^2 r (3G + 1) per KArAt head; softmax heads as thop."""
    soft = heads - karat_heads
    return karat_heads * n * n * (2 * d + r * (3 * grid + 1)) + soft * (n * n * 2 * d + n * (3 * n - 1))


CORE_CHECK = ATTEND + """
import sys
from fvcore.nn import FlopCountAnalysis
from mmengine.analysis import FlopAnalyzer
from karat import KArAtConfig
from karat.flops import FLOP_HANDLES
for impl in sys.argv[1:]:
    for num_attention in (2, 1):
        cfg = KArAtConfig(grid=3, hidden_dim=4, impl=impl, mixed_head=num_attention < 2, num_attention=num_attention)
        model = Attend(cfg).eval()
        x = torch.randn(1, 16, 3 * 2 * 16)
        for analyzer in (FlopCountAnalysis, FlopAnalyzer):
            a = analyzer(model, (x,)).set_op_handle(**FLOP_HANDLES).unsupported_ops_warnings(False)
            print(impl, num_attention, analyzer.__name__, a.total(), dict(a.unsupported_ops()),
                  sorted(a.uncalled_modules()))
"""


@pytest.fixture(scope="module")
def core_counts() -> dict:
    """``{impl: rows}``: fvcore's and mmengine's counts of a host in miniature, for every impl at once in one
    process (fused: Triton, interpreted on the CPU, where it is installed)."""
    require("fvcore")
    require("mmengine")
    impls = ["reference", "efficient"] + (["fused"] if importlib.util.find_spec("triton") else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", CORE_CHECK, *impls], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" ", 4) for line in proc.stdout.splitlines()]
    return {impl: [row for row in rows if row[0] == impl] for impl in impls}


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "efficient", "fused"])
def test_one_count_per_core_call_whichever_impl_serves_it(impl, core_counts):
    if impl == "fused":
        require_triton()
    rows = core_counts[impl]
    assert len(rows) == 4  # two analyzers, num_attention 2 and 1
    for _, num_attention, analyzer, total, rest in rows:
        # num_attention 1: one KArAt head and one softmax head, both inside the one counted call
        assert int(total) == _expected(2, int(num_attention), n=16, d=16, r=4, grid=3), (impl, analyzer)
        assert rest == "{} []", (impl, analyzer, rest)  # nothing unsupported, no submodule reported as never called


def test_other_traces_are_left_as_they_were():
    namespace = {}
    exec(ATTEND, namespace)
    model = namespace["Attend"](KArAtConfig(grid=2, hidden_dim=4, impl="reference")).eval()
    graph = torch.jit.trace(model, torch.randn(1, 16, 96)).inlined_graph
    assert "KArAtCall" not in str(graph) and "aten::cos" in str(graph)


@pytest.mark.slow
def test_detectron2_analyze_model_counts_a_karat_vitdet_backbone_like_karat_flops():
    require("detectron2")
    from detectron2.config import LazyConfig, instantiate
    from detectron2.utils.analysis import FlopCountAnalysis

    cfg = LazyConfig.load(str(ROOT / "configs" / "shapes" / "mask_rcnn_vitdet_karat_t_shapes.py"))
    # importing the config imported detectron2_plugin, which registered the handle for every FlopCountAnalysis
    assert "prim::PythonOp.KArAtCall" in importlib.import_module("fvcore.nn.flop_count")._DEFAULT_SUPPORTED_OPS
    image = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    counts = {}
    for impl in ("reference", "efficient"):  # rel-pos bias: the fused kernels do not serve ViTDet
        cfg.model.backbone.net.karat = dict(cfg.model.backbone.net.karat, impl=impl)
        model = instantiate(cfg.model).eval()
        data = [{"image": image, "height": 32, "width": 32}]
        host = FlopCountAnalysis(model, data)  # what tools/analyze_model.py --tasks flop runs per input
        host.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        backbone = host.by_module()["model.backbone"]
        _no_karat_op_unsupported(host.unsupported_ops())
        ours = count_flops(model.backbone, model.preprocess_image(data).tensor)
        assert backbone == pytest.approx(ours["total"] * 1e9, rel=0.01)
        # 8 windowed blocks (16 windows of 16 tokens) and 4 global blocks (256 tokens), 3 heads, r = 12, G = 3
        assert host.by_operator()["karat_operator"] == 3 * 12 * 10 * (8 * 16 * 16 ** 2 + 4 * 256 ** 2)
        counts[impl] = host.total()
    assert counts["reference"] == counts["efficient"]


@pytest.mark.slow
def test_mmseg_get_flops_counts_a_karat_upernet_backbone_like_karat_flops():
    require("mmseg")
    from mmengine import Config
    from mmengine.analysis import FlopAnalyzer, get_model_complexity_info
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    cfg = Config.fromfile(str(MMSEG_EMBEDDED))
    # the config's custom_imports imported mmseg_configs, which registered the handle for every FlopAnalyzer
    tables = importlib.import_module("mmengine.analysis.complexity_analysis")
    assert "prim::PythonOp.KArAtCall" in tables._DEFAULT_SUPPORTED_FLOP_OPS
    counts = {}
    for impl in ("reference", "efficient"):
        cfg.model.backbone.impl = impl
        with DefaultScope.overwrite_default_scope(cfg.default_scope):  # mmseg's, whichever scope is current
            model = MODELS.build(cfg.model)  # as get_flops.py: no auxiliary head, a preprocessed random picture
        model.auxiliary_head = None
        shape = (3, 16, 16)
        data = model.data_preprocessor({"inputs": [torch.rand(shape)],
                                        "data_samples": [SegDataSample(metainfo=dict(ori_shape=shape[1:],
                                                                                     pad_shape=shape[1:]))]})
        model.eval()
        # get_flops.py passes input_shape too, which mmengine 0.10 refuses next to inputs; inputs alone is its intent
        info = get_model_complexity_info(model, inputs=data["inputs"], show_table=False, show_arch=False)
        host = FlopAnalyzer(model, data["inputs"]).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        assert host.total() == info["flops"]
        _no_karat_op_unsupported(host.unsupported_ops())
        ours = count_flops(model.backbone, data["inputs"])
        assert host.by_module()["backbone"] == pytest.approx(ours["total"] * 1e9, rel=0.01)
        # 12 blocks, 3 heads, 64 tokens, r = 12, G = 3
        assert host.by_operator()["karat_operator"] == 12 * 3 * 64 * 64 * 12 * 10
        counts[impl] = info["flops"]
    assert counts["reference"] == counts["efficient"]


@pytest.mark.parametrize("ambient", ["mmdet", "mmengine"])
def test_tools_flops_builds_in_the_configs_scope_and_leaves_the_current_one(ambient):
    """A scope left current by an earlier runner neither misdirects the build nor is replaced by mmseg's."""
    require("mmseg")
    from mmengine.registry import DefaultScope

    from mmseg_configs import KArAtVisionTransformer
    from tools.flops import mmseg_backbone

    leave_default_scope(ambient)
    backbone, size = mmseg_backbone(str(MMSEG_EMBEDDED), None)
    assert type(backbone) is KArAtVisionTransformer and size == 16
    assert DefaultScope.get_current_instance().scope_name == ambient


@pytest.mark.slow
def test_tools_flops_counts_host_backbones_from_their_configs():
    require("detectron2")
    require("mmseg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "flops.py"),
         "--detectron2-config", str(ROOT / "configs" / "shapes" / "mask_rcnn_vitdet_karat_t_shapes.py"),
         "--mmseg-config", str(MMSEG_EMBEDDED)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:6]]
            for line in proc.stdout.splitlines() if "(backbone)" in line}
    vitdet = rows["mask_rcnn_vitdet_karat_t_shapes (backbone)"]
    upernet = rows["upernet_vit-t2-karat_1xb8-60iter_embedded-16x16 (backbone)"]
    assert vitdet[3] == pytest.approx(3 * 12 * 10 * (8 * 16 * 16 ** 2 + 4 * 256 ** 2) / 1e9, abs=6e-4)
    assert upernet[3] == pytest.approx(12 * 3 * 64 * 64 * 12 * 10 / 1e9, abs=6e-4)
    assert vitdet[2] > vitdet[3] and upernet[2] > upernet[3]
