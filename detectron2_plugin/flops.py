"""KArAt in fvcore's counters, as detectron2's ``tools/analyze_model.py --tasks flop`` / ``activation`` run them.

fvcore counts op by op from a jit trace; while it traces, every KArAt core call is one ``prim::PythonOp.KArAtCall``
(``karat.flops``), whose handle returns the paper's count for the call, whichever impl computed it. Importing
``detectron2_plugin`` (any config that uses ``KArAtViT`` does) adds that handle to fvcore's default tables, which
every ``FlopCountAnalysis`` / ``ActivationCountAnalysis`` (detectron2's subclass included) copies when created.
"""
from __future__ import annotations

import importlib

from karat.flops import ACTIVATION_HANDLES, FLOP_HANDLES, register


def register_fvcore_handles() -> bool:
    """Add the KArAt handles to fvcore's default op tables; False where fvcore is not installed."""
    try:  # the modules, not the functions of the same name that fvcore.nn exports
        flop_count = importlib.import_module("fvcore.nn.flop_count")
        activation_count = importlib.import_module("fvcore.nn.activation_count")
    except ImportError:  # pragma: no cover - detectron2 depends on fvcore
        return False
    register(flop_count._DEFAULT_SUPPORTED_OPS, FLOP_HANDLES)
    register(activation_count._DEFAULT_SUPPORTED_OPS, ACTIVATION_HANDLES)
    return True


register_fvcore_handles()
