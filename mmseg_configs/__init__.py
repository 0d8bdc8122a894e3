"""KArAt for OpenMMLab: the adapter module that mmseg / mmdet configs load through ``custom_imports``, and the configs."""
