"""Command lines on top of the packages. Each runs as ``python -m tools.NAME`` or, where the README shows it, as
``python tools/NAME.py`` from an installed (``pip install -e .``) checkout; the main ones are also console scripts
(``[project.scripts]`` in pyproject.toml: ``karat-train``, ``karat-convert-d2``, ``karat-convert-mmseg``,
``karat-bench``, ``karat-flops``, ``karat-demo``, ``karat-analyze``). Nothing in the packages imports ``tools``."""
