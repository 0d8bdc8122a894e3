"""KArAt in mmengine's counters, as mmseg's ``tools/analysis_tools/get_flops.py`` (and mmdet's) run them.

``mmengine.analysis.get_model_complexity_info`` builds a ``FlopAnalyzer`` and an ``ActivationAnalyzer``, jit-trace
counters ported from fvcore. While they trace, every KArAt core call is one ``prim::PythonOp.KArAtCall``
(``karat.flops``), whose handle returns the paper's count for the call, whichever impl computed it. Importing
``mmseg_configs`` (``custom_imports`` of every KArAt config does) adds that handle to mmengine's default tables,
which every analyzer copies when created.
"""
from __future__ import annotations

from karat.flops import ACTIVATION_HANDLES, FLOP_HANDLES, register


def register_mmengine_handles() -> bool:
    """Add the KArAt handles to mmengine's default op tables; False where mmengine has no analysis module."""
    try:
        from mmengine.analysis import complexity_analysis
    except ImportError:  # pragma: no cover - mmengine < 0.6
        return False
    register(complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS, FLOP_HANDLES)
    register(complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS, ACTIVATION_HANDLES)
    return True


register_mmengine_handles()
