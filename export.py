"""Export the whole VCP-CLIP test forward to one ONNX graph, for ONNX Runtime without PyTorch.

    python export.py --checkpoint_path vcp_weight/train_visa.pth \
        --pretrained_path pretrained_weight/ViT-L-14-336px.pt --image_size 518 --output vcp.onnx

The graph maps CLIP-normalized images ``images`` [B,3,S,S] float32 (B dynamic) to the two
test-time abnormal maps ``raw`` and ``new`` [B,S,S] float32 (docs/reproduction.md §6: the mean over
the tapped
layers of channel 1, before the smoothing and blending that ``predict.py`` applies). Beside it
goes ``<output stem>.json``, what a reader needs: image size, normalization, the model and backbone
configs, the checkpoint, opset and precision. The export is then checked: one random image through
ONNX Runtime against the PyTorch model, the max |diff| printed and recorded in the JSON.

``--precision fp16`` stores the weights in fp16 (half the file) and computes in fp16 except the
LayerNorms (fp32, as in CLIP); inputs and outputs stay float32. Export runs on the CPU; the graph
does not depend on the device it was exported on (docs/export.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from utils.cli import (INPUT_ERRORS, ArgumentParser, add_model_flags, check_output_folder, fail,
                       model_source)
from utils.errors import UsageError
from utils.inference.onnx_runtime import EXPORT_DTYPES, export_onnx, sidecar_path
from utils.paths import DEFAULT_CHECKPOINT
from utils.inference.runtime import load_model


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Export VCP-CLIP (images -> raw, new maps) to ONNX")
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT)
    p.add_argument("--output", default="./vcp_clip.onnx",
                   help="the .onnx file; <output stem>.json is written beside it")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    add_model_flags(p)  # --precision here: fp32 (default) or fp16 weights in the graph
    args = p.parse_args(argv)
    args.precision = args.precision or "fp32"
    if args.precision not in EXPORT_DTYPES:
        raise UsageError(f"--precision {args.precision}: export supports {sorted(EXPORT_DTYPES)}")
    if Path(args.output).suffix != ".onnx":
        raise UsageError(f"--output {args.output}: expected a file name ending in .onnx")
    check_output_folder(Path(args.output).parent, "--output")
    return args


def export(args: argparse.Namespace) -> dict:
    model = load_model(model_source(args, args.checkpoint_path), torch.device("cpu"))
    provenance = {
        "checkpoint": str(Path(args.checkpoint_path).resolve()) if args.checkpoint_path else None,
        "pretrained": str(Path(args.pretrained_path))}
    return export_onnx(model, args.output, args.precision, args.opset, provenance)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        meta = export(args)
    except INPUT_ERRORS as e:
        return fail(e)
    diff = meta["check_max_abs_diff"]
    print(f"wrote {args.output} and {sidecar_path(args.output)} ({meta['precision']}, opset "
          f"{meta['opset']}, {meta['input']['image_size']} px); ONNX Runtime vs PyTorch fp32 on "
          f"one image: max |diff| raw {diff['raw']:.1e}, new {diff['new']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
