"""An exported VCP-CLIP on ONNX Runtime: the exporter, the description file (a JSON "sidecar"
beside the .onnx) and the runtime that reads both.

The graph is the whole test forward, ``images`` [B,3,S,S] (CLIP-normalized float32) -> ``raw``,
``new`` [B,S,S] float32 (docs/export.md); it has the maps only, no patch tokens, so it serves
zero-shot scoring.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.data.dataset import CLIP_MEAN, CLIP_STD
from utils.errors import UsageError
from utils.files import atomic_write
from utils.inference.runtime import RuntimeOutput

__all__ = ["ONNX_FORMAT", "ONNX_INPUT", "ONNX_OUTPUTS", "EXPORT_DTYPES", "sidecar_path",
           "read_sidecar", "OnnxRuntime", "AbnormalMaps", "template_vocabulary", "export_program",
           "save_program", "export_onnx"]

ONNX_FORMAT = "vcp-clip-onnx/1"
ONNX_INPUT, ONNX_OUTPUTS = "images", ("raw", "new")
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ORT_CPU, ORT_GPU = "CPUExecutionProvider", "CUDAExecutionProvider"


def sidecar_path(onnx_path: str | Path) -> Path:
    """The JSON that travels with an exported model: ``model.onnx`` -> ``model.json``."""
    return Path(onnx_path).with_suffix(".json")


def read_sidecar(onnx_path: Path) -> dict:
    """The exported model's JSON, checked for what the runtime reads from it."""
    path = sidecar_path(onnx_path)
    try:
        meta = json.loads(path.read_text())
        size = meta["input"]["image_size"]
    except FileNotFoundError:
        raise UsageError(f"{onnx_path}: its description {path} is missing (export.py writes "
                         "both; keep them together)", option="onnx") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{onnx_path}: {path} is not an export.py description "
                         f"({type(e).__name__}: {e})", option="onnx") from None
    if meta.get("format") != ONNX_FORMAT or not isinstance(size, int):
        raise UsageError(f"{onnx_path}: {path} is not an export.py description (format "
                         f"{meta.get('format')!r}, expected {ONNX_FORMAT!r})", option="onnx")
    return meta


def _onnx_providers(ort, device: str | None, device_id: int) -> list:
    """``device`` None: the GPU provider (GPU ``device_id``) where onnxruntime-gpu is installed,
    else the CPU; otherwise a PyTorch device whose type names ONNX Runtime's provider (``cpu``;
    ``cuda`` or ``cuda:N``), an error where that provider is missing."""
    if device is None:
        return [(ORT_GPU, {"device_id": device_id}), ORT_CPU] if (
            ORT_GPU in ort.get_available_providers()) else [ORT_CPU]
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    provider = parsed and f"{parsed.type.upper()}ExecutionProvider"
    if provider not in (ORT_CPU, ORT_GPU):
        raise UsageError(f"{device}: with an ONNX model, expected cpu, cuda or cuda:N",
                         option="device")
    if provider == ORT_CPU:
        return [ORT_CPU]
    if ORT_GPU not in ort.get_available_providers():
        raise UsageError(f"{device}: this onnxruntime has no CUDA provider (install "
                         "onnxruntime-gpu)", option="device")
    return [(ORT_GPU, {"device_id": device_id if parsed.index is None else parsed.index}), ORT_CPU]


def _session(onnx_path: Path, providers: list):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fp16 graphs warn about CPU constant folding
    try:
        return ort.InferenceSession(str(onnx_path), options, providers)
    except Exception as e:  # onnxruntime's own error types: a corrupt or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"{onnx_path} is not a readable ONNX model ({type(e).__name__}: "
                         f"{first})", option="onnx") from None


class OnnxRuntime:
    """An exported graph on ONNX Runtime as a runtime (maps only: ``has_features`` is False).
    The graph is checked for what the exporter writes: ``images`` [B,3,S,S] -> ``raw``, ``new``."""

    has_features = False

    def __init__(self, onnx_path: str | Path, device: str | None = None, device_id: int = 0):
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise UsageError(f"{onnx_path} does not exist (write it with export.py)",
                             option="onnx")
        self.meta = read_sidecar(onnx_path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError("needs onnxruntime (pip install onnxruntime)", option="onnx") \
                from None
        self.session = _session(onnx_path, _onnx_providers(ort, device, device_id))
        self.image_size = size = self.meta["input"]["image_size"]
        inputs = [(i.name, i.shape[1:]) for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [(ONNX_INPUT, [3, size, size])] or outputs[:2] != list(ONNX_OUTPUTS):
            raise UsageError(f"{onnx_path}: expected input {ONNX_INPUT} [B,3,{size},{size}] and "
                             f"outputs {list(ONNX_OUTPUTS)} (export.py's), got inputs {inputs} "
                             f"and outputs {outputs}", option="onnx")

    def __call__(self, images: torch.Tensor) -> RuntimeOutput:
        raw, new = self.session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: images.numpy()})
        return RuntimeOutput(raw, new)  # [B, S, S] float32 each


# -- the exporter ----------------------------------------------------------------------------

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


def _check(output: Path, reference: AbnormalMaps, image_size: int) -> dict:
    """One random image (batch 1, not the traced 2: the batch is dynamic) through ONNX Runtime,
    read as the runtime reads it, and through the fp32 PyTorch model -> max |diff| per map."""
    runtime = OnnxRuntime(output, "cpu")
    images = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = reference(images)
    got = runtime(images)
    return {name: float(np.abs(g - w.numpy()).max())
            for name, g, w in zip(ONNX_OUTPUTS, (got.raw, got.new), want)}


def export_onnx(model: nn.Module, output: str | Path, precision: str = "fp32",
                opset: int | None = None, provenance: dict | None = None) -> dict:
    """Export a VCP-CLIP model (fp32, on the CPU) to ``output`` (.onnx) and its sidecar, check
    the graph on ONNX Runtime against the model, and return the sidecar (with the check's
    ``check_max_abs_diff``). ``provenance`` (checkpoint, weights) is recorded in the sidecar."""
    output, size = Path(output), model.cfg.image_size
    reference = AbnormalMaps(model)  # fp32, the whole model: what the export is checked against
    graph = AbnormalMaps(template_vocabulary(copy.deepcopy(model)), EXPORT_DTYPES[precision])
    program = export_program(graph, size, opset)
    data = save_program(program, output)
    opset = next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx"))
    meta = {
        "format": ONNX_FORMAT, "onnx": output.name, "external_data": data,
        "input": {"name": ONNX_INPUT, "shape": ["batch", 3, size, size],
                  "dtype": "float32", "image_size": size,
                  "preprocess": "RGB, resize to image_size x image_size (bicubic), "
                                "scale to [0, 1], then (x - mean) / std per channel",
                  "mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "outputs": {name: ["batch", size, size] for name in ONNX_OUTPUTS},
        "precision": precision, "opset": opset, "torch": torch.__version__,
        "vcp_config": model.cfg.to_dict(), "clip_config": model.clip.cfg.to_json_dict(),
        **(provenance or {}),
    }
    atomic_write(sidecar_path(output), json.dumps(meta, indent=1) + "\n")
    meta["check_max_abs_diff"] = _check(output, reference, size)
    atomic_write(sidecar_path(output), json.dumps(meta, indent=1) + "\n")
    return meta
