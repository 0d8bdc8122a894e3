"""The paper's analyses of a checkpoint: ``python -m tools.analyze CKPT --out DIR`` (or ``karat-analyze``)."""
from karat.analysis.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
