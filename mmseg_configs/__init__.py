"""KArAt for OpenMMLab: the adapter module that mmseg / mmdet configs load through ``custom_imports``, and the configs."""
from . import flops  # noqa: F401,E402  (KArAt's handles in mmengine's counters, see flops.py)
