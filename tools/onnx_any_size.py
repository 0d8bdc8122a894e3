#!/usr/bin/env python
"""One ONNX graph, several image sizes: a ``dynamic_img_size=True`` KArAt ViT exported once by the dynamo exporter
(batch, height and width dynamic), run by ONNX Runtime at each size and compared with PyTorch (README "Export").

    python tools/onnx_any_size.py --out benchmarks/onnx_any_size.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import timm
import torch

import karat  # noqa: F401  (registers the KArAt models)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224_karat")
    p.add_argument("--export-size", type=int, default=224)
    p.add_argument("--sizes", nargs="+", default=["224", "160", "288", "160x288"], help="H or HxW, in pixels")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    import onnxruntime as ort  # an optional dependency: --help works without it

    torch.manual_seed(0)
    model = timm.create_model(args.model, dynamic_img_size=True).eval()
    patch = model.patch_embed.patch_size[0]
    grid_h, grid_w = torch.export.Dim("grid_h", min=2, max=64), torch.export.Dim("grid_w", min=2, max=64)
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024), 2: patch * grid_h, 3: patch * grid_w},)
    x = torch.randn(2, 3, args.export_size, args.export_size)  # batch 2: torch.export specialises a size of 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.time()
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=shapes, verbose=False)
        seconds = time.time() - start
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rows = []
        for size in args.sizes:
            h, w = (int(v) for v in (size.split("x") if "x" in size else (size, size)))
            xi = torch.randn(2, 3, h, w)
            with torch.no_grad():
                ref = model(xi)
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: xi.numpy()})[0])
            rows.append(dict(size=f"{h}x{w}", max_abs_diff=(got - ref).abs().max().item(),
                             max_abs_output=ref.abs().max().item()))
            print(f"{h}x{w}: max |ONNX Runtime - PyTorch| = {rows[-1]['max_abs_diff']:.2e} "
                  f"(outputs up to {rows[-1]['max_abs_output']:.2f})")
    result = dict(model=args.model, export_size=args.export_size, export_seconds=round(seconds, 1), rows=rows,
                  torch=torch.__version__, onnxruntime=ort.__version__,
                  command="python tools/onnx_any_size.py --out benchmarks/onnx_any_size.json")
    print(f"exported once at {args.export_size} px in {seconds:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
