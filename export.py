"""Export the whole VCP-CLIP test forward to one ONNX graph, for ONNX Runtime without PyTorch.

    python export.py --checkpoint_path vcp_weight/train_visa.pth \
        --pretrained_path pretrained_weight/ViT-L-14-336px.pt --image_size 518 --output vcp.onnx

The graph maps CLIP-normalized images ``images`` [B,3,S,S] float32 (B dynamic) to the two
test-time abnormal maps ``raw`` and ``new`` [B,S,S] float32 (SPEC §6: the mean over the tapped
layers of channel 1, before the smoothing and blending that ``predict.py`` applies). Beside it
goes ``<output stem>.json``, what a reader needs: image size, normalization, the model and backbone
configs, the checkpoint, opset and precision. The export is then checked: one random image through
ONNX Runtime against the PyTorch model, the max |diff| printed and recorded in the JSON.

``--precision fp16`` stores the weights in fp16 (half the file) and computes in fp16 except the
LayerNorms (fp32, as in CLIP); inputs and outputs stay float32. Export runs on the CPU; the graph
does not depend on the device it was exported on. (README, 'Export to ONNX'.)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.cli import (INPUT_ERRORS, ArgumentParser, UsageError, add_model_flags, build_model,
                       check_output_folder, fail, read_checkpoint_and_config)
from utils.data import CLIP_MEAN, CLIP_STD
from utils.files import atomic_write
from utils.prediction import ONNX_FORMAT, ONNX_INPUT, ONNX_OUTPUTS, onnx_maps, sidecar_path

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class AbnormalMaps(nn.Module):
    """What the graph computes: ``VCPCLIP.forward(images).abnormal()`` at ``dtype``, with
    float32 images in and float32 maps out (the model itself is not touched)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model, self.dtype = model.to(dtype), dtype
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, new = self.model(images.to(self.dtype)).abnormal(per_image=False)  # [B, S, S]
        return raw.float(), new.float()


def template_vocabulary(model: nn.Module) -> nn.Module:
    """The model with its token table cut to the rows of its fixed templates, ``template_ids``
    renumbered into them: the same maps, and a graph without the other 49,400 rows (152 MB in
    fp32 at ViT-L's width 768)."""
    rows, ids = torch.unique(model.template_ids, return_inverse=True)  # [U], [S, 77]
    weight = model.clip.token_embedding.weight[rows].detach().clone()  # [U, T]
    model.clip.token_embedding = nn.Embedding.from_pretrained(weight, freeze=True)
    model.template_ids = ids
    return model


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Export VCP-CLIP (images -> raw, new maps) to ONNX")
    p.add_argument("--checkpoint_path", default="./vcp_weight/train_visa.pth")
    p.add_argument("--output", default="./vcp_clip.onnx",
                   help="the .onnx file; <output stem>.json is written beside it")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    add_model_flags(p)  # --precision here: fp32 (default) or fp16 weights in the graph
    args = p.parse_args(argv)
    args.precision = args.precision or "fp32"
    if args.precision not in DTYPES:
        raise UsageError(f"--precision {args.precision}: export supports {sorted(DTYPES)}")
    if Path(args.output).suffix != ".onnx":
        raise UsageError(f"--output {args.output}: expected a file name ending in .onnx")
    check_output_folder(Path(args.output).parent, "--output")
    return args


def export_program(maps: AbnormalMaps, image_size: int, opset: int | None):
    """torch.export (dynamo) -> ONNX with a dynamic batch. The TorchScript exporter
    (``dynamo=False``) traces the prompted text forward wrongly (maps off by 1e-2), so not it."""
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return torch.onnx.export(maps, (example,), input_names=[ONNX_INPUT],
                             output_names=list(ONNX_OUTPUTS),
                             dynamic_shapes=({0: torch.export.Dim("batch")},),
                             opset_version=opset, dynamo=True, verbose=False)


def save_program(program, output: Path) -> str | None:
    """Write the model (and, past ONNX's 2 GB limit, its ``.data`` file) atomically: into a
    temporary folder beside ``output`` first, then one rename per file. Returns the data file's
    name, or None when the weights are inside the .onnx."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        program.save(Path(tmp) / output.name)  # external data only when the exporter needs it
        written = sorted(p.name for p in Path(tmp).iterdir())
        data = next((n for n in written if n != output.name), None)
        for name in sorted(written, key=lambda n: n == output.name):  # the .onnx last
            os.replace(Path(tmp) / name, output.parent / name)
    return data


def check_with_onnxruntime(output: Path, reference: AbnormalMaps, image_size: int) -> dict:
    """One random image (batch 1, not the traced 2: the batch is dynamic) through ONNX Runtime,
    read the way predict.py reads it, and through the fp32 PyTorch model -> max |diff| per map."""
    maps_fn, _ = onnx_maps(output, "cpu")
    images = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = reference(images)
    return {name: float(np.abs(g - w.numpy()).max())
            for name, g, w in zip(ONNX_OUTPUTS, maps_fn(images), want)}


def export(args: argparse.Namespace) -> dict:
    payload, cfg = read_checkpoint_and_config(args, args.checkpoint_path)
    model = build_model(args, cfg, payload, torch.device("cpu"), args.checkpoint_path)
    reference = AbnormalMaps(model)  # fp32, the whole model: what the export is checked against
    graph = AbnormalMaps(template_vocabulary(copy.deepcopy(model)), DTYPES[args.precision])
    output = Path(args.output)
    program = export_program(graph, cfg.image_size, args.opset)
    data = save_program(program, output)
    opset = next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx"))
    meta = {
        "format": ONNX_FORMAT, "onnx": output.name, "external_data": data,
        "input": {"name": ONNX_INPUT, "shape": ["batch", 3, cfg.image_size, cfg.image_size],
                  "dtype": "float32", "image_size": cfg.image_size,
                  "preprocess": "RGB, resize to image_size x image_size (bicubic), "
                                "scale to [0, 1], then (x - mean) / std per channel",
                  "mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "outputs": {name: ["batch", cfg.image_size, cfg.image_size] for name in ONNX_OUTPUTS},
        "precision": args.precision, "opset": opset, "torch": torch.__version__,
        "vcp_config": cfg.to_dict(), "clip_config": model.clip.cfg.to_json_dict(),
        "checkpoint": str(Path(args.checkpoint_path).resolve()) if args.checkpoint_path else None,
        "pretrained": str(Path(args.pretrained_path)),
    }
    atomic_write(sidecar_path(output), json.dumps(meta, indent=1) + "\n")
    meta["check_max_abs_diff"] = check_with_onnxruntime(output, reference, cfg.image_size)
    atomic_write(sidecar_path(output), json.dumps(meta, indent=1) + "\n")
    return meta


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
