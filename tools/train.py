#!/usr/bin/env python
"""Classification training/evaluation (the paper's command line); see classification/main.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classification.args import get_args_parser  # noqa: E402
from classification.main import main  # noqa: E402

if __name__ == "__main__":
    main(get_args_parser().parse_args())
