#!/usr/bin/env python
"""The paper's entry point, at the repository root so its commands run as written:

    python main.py --model vit_tiny_patch16_224 --data-set IMNET --data-path /imagenet ...
    torchrun --nproc_per_node=8 main.py ...

It is ``classification.main`` (also ``python -m classification.main`` and ``python -m tools.train``, ``karat-train``).
"""
from classification.main import cli

if __name__ == "__main__":
    raise SystemExit(cli())
