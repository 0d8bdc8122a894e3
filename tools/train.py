#!/usr/bin/env python
"""Classification training/evaluation (the paper's command line): ``python -m tools.train`` or ``karat-train``;
the code is classification/main.py."""
from classification.main import cli as main

if __name__ == "__main__":
    raise SystemExit(main())
