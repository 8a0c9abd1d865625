"""The prediction path, images -> maps -> overlays, masks and scores: the one home that
``predict.py`` and every other front end use (DESIGN.md).

The map is the smoothed blend of SPEC §10, ``gaussian_filter(0.2*raw + 0.8*new, sigma=8)``,
**without** test.py's per-product min-max normalization: a value means the same on every image,
so a fixed threshold is a usable deployment setting. The image score is the mean of the 2000
largest pixels of each branch, added (0 to 2).

How the maps are computed is a parameter (``MapsFn``): ``torch_maps`` runs the PyTorch model,
``onnx_maps`` a graph that ``export.py`` wrote, on ONNX Runtime; any other runtime that turns a
batch of preprocessed images into the two abnormal maps fits in.

Beyond zero-shot (``PatchScoring``, PyTorch only: it reads the patch tokens), ``predict_groups``
scores the images folder by folder: against a few-shot reference memory (``memory_of``) or each
against the other images of its folder (mutual scoring), and fuses that map with each zero-shot
branch over the folder's images (``utils.metrics.fuse_maps``) before the same blend and score.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from model.patch_scoring import (MUTUAL_FRACTION, mutual_score, reference_memory,
                                 reference_score, score_map)
from utils.cli import UsageError, autocast
from utils.data import image_transform
from utils.files import atomic_write
from utils.metrics import fuse_maps, image_scores, smoothed_blend
from utils.visualize import heatmap_overlay, write_png

__all__ = ["IMAGE_SUFFIXES", "SCORE_FIELDS", "MapsFn", "Prediction", "Skipped", "expand_inputs",
           "read_rgb", "unique_names", "torch_maps", "ONNX_FORMAT", "ONNX_INPUT", "ONNX_OUTPUTS",
           "sidecar_path", "onnx_maps", "predict_paths", "full_size", "overlay", "binary_mask",
           "scores_csv", "OutputWriter", "Shard", "memory_of", "PatchScoring", "folder_groups",
           "predict_groups"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
SCORE_FIELDS = ("path", "image_score", "max_pixel_score")

# images [B,3,S,S] (CLIP-normalized) -> abnormal maps (raw, new), float32 numpy [B,S,S] each
MapsFn = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


@dataclass
class Prediction:
    """One image's result: ``amap`` [S,S] float32 at the model's resolution."""

    index: int  # position in the input list
    path: Path
    amap: np.ndarray
    image_score: float

    @property
    def max_pixel_score(self) -> float:
        return float(self.amap.max())

    def row(self) -> dict:
        return {"path": str(self.path), "image_score": self.image_score,
                "max_pixel_score": self.max_pixel_score}


@dataclass
class Skipped:
    """An input that could not be read (corrupt, unsupported), or the only readable image of its
    folder under mutual scoring: reported, never fatal. ``reason`` says which."""

    index: int
    path: Path
    reason: str


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders' image files (sorted), glob matches (sorted); each path once."""
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matches:
                raise UsageError(f"input {item!r} is not a file, a folder or a matching glob")
            found += [m for m in matches if m.is_file()]
    return list(dict.fromkeys(found))


def read_rgb(path: Path) -> Image.Image:
    """Any common format as 8-bit RGB: grey and 16-bit images are scaled, alpha is dropped."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            im = Image.fromarray(np.clip(a / top * 255.0, 0, 255).astype(np.uint8))
        return im.convert("RGB")


def unique_names(paths: list[Path]) -> list[str]:
    """Output names: the file stem, with _1, _2, ... where stems repeat."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return names


class _Images(Dataset):
    """Yields (index, image tensor) or (index, reason) for a file that cannot be read."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.transform = paths, image_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(read_rgb(self.paths[i]))
        except Exception as e:  # a corrupt or unsupported file is skipped, not fatal
            return i, f"cannot read it ({type(e).__name__}: {e})"


def _collate(items):
    good = [(i, x) for i, x in items if torch.is_tensor(x)]
    bad = [(i, x) for i, x in items if not torch.is_tensor(x)]
    images = torch.stack([x for _, x in good]) if good else None  # [B, 3, S, S]
    return [i for i, _ in good], images, bad


def _run_model(model: torch.nn.Module, device: torch.device, precision: str | None,
               images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor]]:
    """images [B,3,S,S] -> raw, new [B,S,S] float32 and the patch tokens, per layer [B,L,W]
    (inference mode, the device's autocast)."""
    with torch.inference_mode(), autocast(device, precision):
        maps = model(images.to(device))
        raw, new = maps.abnormal()  # [B, S, S] each
    return raw.float().cpu().numpy(), new.float().cpu().numpy(), maps.patch_tokens


def torch_maps(model: torch.nn.Module, device: torch.device, precision: str | None) -> MapsFn:
    """The PyTorch model as a ``MapsFn``."""
    def maps(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return _run_model(model, device, precision, images)[:2]
    return maps


# An exported model (export.py): one input, two outputs, and a JSON sidecar beside the .onnx
ONNX_FORMAT = "vcp-clip-onnx/1"
ONNX_INPUT, ONNX_OUTPUTS = "images", ("raw", "new")


def sidecar_path(onnx_path: str | Path) -> Path:
    """The JSON that travels with an exported model: ``model.onnx`` -> ``model.json``."""
    return Path(onnx_path).with_suffix(".json")


def read_sidecar(onnx_path: Path) -> dict:
    """The exported model's JSON, checked for what the prediction path reads from it."""
    path = sidecar_path(onnx_path)
    try:
        meta = json.loads(path.read_text())
        size = meta["input"]["image_size"]
    except FileNotFoundError:
        raise UsageError(f"--onnx {onnx_path}: its description {path} is missing (export.py "
                         "writes both; keep them together)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--onnx {onnx_path}: {path} is not an export.py description "
                         f"({type(e).__name__}: {e})") from None
    if meta.get("format") != ONNX_FORMAT or not isinstance(size, int):
        raise UsageError(f"--onnx {onnx_path}: {path} is not an export.py description (format "
                         f"{meta.get('format')!r}, expected {ONNX_FORMAT!r})")
    return meta


ORT_CPU, ORT_GPU = "CPUExecutionProvider", "CUDAExecutionProvider"


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
        raise UsageError(f"--device {device}: with --onnx, expected cpu, cuda or cuda:N")
    if provider == ORT_CPU:
        return [ORT_CPU]
    if ORT_GPU not in ort.get_available_providers():
        raise UsageError(f"--device {device}: this onnxruntime has no CUDA provider "
                         "(install onnxruntime-gpu)")
    return [(ORT_GPU, {"device_id": device_id if parsed.index is None else parsed.index}), ORT_CPU]


def onnx_maps(onnx_path: str | Path, device: str | None = None,
              device_id: int = 0) -> tuple[MapsFn, dict]:
    """An exported model on ONNX Runtime as a ``MapsFn``, and its sidecar (image size, configs).
    The graph is checked for what export.py writes: ``images`` [B,3,S,S] -> ``raw``, ``new``."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UsageError(f"--onnx {onnx_path} does not exist (write it with export.py)")
    meta = read_sidecar(onnx_path)
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("--onnx needs onnxruntime (pip install onnxruntime)") from None
    providers = _onnx_providers(ort, device, device_id)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fp16 graphs warn about CPU constant folding
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers)
    except Exception as e:  # onnxruntime's own error types: a corrupt or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"--onnx {onnx_path} is not a readable ONNX model "
                         f"({type(e).__name__}: {first})") from None
    size = meta["input"]["image_size"]
    inputs = [(i.name, i.shape[1:]) for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [(ONNX_INPUT, [3, size, size])] or outputs[:2] != list(ONNX_OUTPUTS):
        raise UsageError(f"--onnx {onnx_path}: expected input {ONNX_INPUT} [B,3,{size},{size}] "
                         f"and outputs {list(ONNX_OUTPUTS)} (export.py's), got inputs {inputs} "
                         f"and outputs {outputs}")

    def maps(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        raw, new = session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: images.numpy()})
        return raw, new  # [B, S, S] float32 each
    return maps, meta


def memory_of(paths: list[Path], model: torch.nn.Module, device: torch.device,
              precision: str | None, image_size: int, batch_size: int = 8) -> list[torch.Tensor]:
    """The few-shot memory of normal reference images: per tapped layer, their normalized patch
    tokens [K*L, W] on the device. An unreadable reference is an error (it would silently weaken
    the memory)."""
    transform, images = image_transform(image_size), []
    for path in paths:
        try:
            images.append(transform(read_rgb(path)))  # [3, S, S]
        except Exception as e:
            raise UsageError(f"reference image {path}: cannot read it ({type(e).__name__}: {e})")
    batches = []
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(images), batch_size):
            batch = torch.stack(images[start:start + batch_size]).to(device)  # [b, 3, S, S]
            batches.append(model(batch).patch_tokens)  # per layer [b, L, W]
    return reference_memory([torch.cat(layer) for layer in zip(*batches)])


def _loader(paths: list[Path], image_size: int, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(_Images(paths, image_size), batch_size=batch_size,
                      num_workers=num_workers, collate_fn=_collate)


def _predictions(indices: list[int], paths: list[Path], raw: np.ndarray,
                 new: np.ndarray) -> Iterator[Prediction]:
    """Predictions from the two abnormal maps [B,S,S] of the inputs ``indices``."""
    for i, amap, score in zip(indices, smoothed_blend(raw, new), image_scores(raw, new)):
        yield Prediction(i, paths[i], amap, float(score))


def predict_paths(paths: list[Path], maps_fn: MapsFn, image_size: int, batch_size: int = 8,
                  num_workers: int = 0) -> Iterator[Prediction | Skipped]:
    """Each input in order as a ``Prediction``, or a ``Skipped`` where it cannot be read."""
    for indices, images, bad in _loader(paths, image_size, batch_size, num_workers):
        for i, reason in bad:
            yield Skipped(i, paths[i], reason)
        if images is None:
            continue
        raw, new = maps_fn(images)  # [B, S, S] each
        yield from _predictions(indices, paths, raw, new)


@dataclass
class PatchScoring:
    """Scoring beyond zero-shot: with a ``memory`` (``memory_of``) each image's patches against
    the few-shot references, without one against the other images of its folder (mutual)."""

    model: torch.nn.Module
    device: torch.device
    precision: str | None
    fusion: str  # utils.metrics.FUSIONS
    memory: list[torch.Tensor] | None = None  # per tapped layer [K*L, W]
    mutual_fraction: float = MUTUAL_FRACTION

    def forward(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor]]:
        """images [B,3,S,S] -> raw, new [B,S,S] float32 and the patch tokens, per layer [B,L,W]."""
        return _run_model(self.model, self.device, self.precision, images)

    def reference_map(self, tokens: list[torch.Tensor], size: int) -> np.ndarray:
        """Per layer [B,L,W] -> [B,S,S] reference score maps."""
        with torch.inference_mode():
            return score_map(reference_score(tokens, self.memory), size).cpu().numpy()

    def mutual_map(self, batches: list[list[torch.Tensor]], size: int) -> np.ndarray:
        """A folder's tokens (per batch, per layer [b,L,W]) -> [N,S,S] mutual score maps."""
        with torch.inference_mode():  # one concatenated layer at a time: [N, L, W]
            layers = (torch.cat([b[i] for b in batches]) for i in range(len(batches[0])))
            return score_map(mutual_score(layers, self.mutual_fraction), size).cpu().numpy()


def folder_groups(paths: list[Path]) -> list[list[int]]:
    """Indices of the inputs grouped by folder; folders in order of their first input."""
    groups: dict[Path, list[int]] = {}
    for i, path in enumerate(paths):
        groups.setdefault(path.parent, []).append(i)
    return list(groups.values())


def predict_groups(paths: list[Path], scoring: PatchScoring, image_size: int, batch_size: int = 8,
                   num_workers: int = 0) -> Iterator[Prediction | Skipped]:
    """As ``predict_paths``, folder by folder (``folder_groups``): a folder's maps are fused once
    all of them are in (mutual scoring needs them all; the sum rule scales over the folder)."""
    for group in folder_groups(paths):
        members = [paths[i] for i in group]
        raw, new, patch, tokens, kept = [], [], [], [], []
        for indices, images, bad in _loader(members, image_size, batch_size, num_workers):
            for i, reason in bad:
                yield Skipped(group[i], members[i], reason)
            if images is None:
                continue
            r, n, t = scoring.forward(images)
            raw.append(r), new.append(n)
            kept += [group[i] for i in indices]
            if scoring.memory is not None:
                patch.append(scoring.reference_map(t, image_size))
            else:
                tokens.append(t)
        if scoring.memory is None and len(kept) == 1:
            yield Skipped(kept[0], paths[kept[0]], "mutual scoring needs another readable "
                                                   "image in its folder")
            continue
        if not kept:
            continue
        patch = np.concatenate(patch) if patch else scoring.mutual_map(tokens, image_size)
        raw, new = fuse_maps(np.concatenate(raw), np.concatenate(new), patch, scoring.fusion)
        yield from _predictions(kept, paths, raw, new)


def full_size(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map [S,S] resized bilinearly to an image's (width, height) -> [H, W] float32."""
    return np.asarray(Image.fromarray(amap).resize(size, Image.BILINEAR))


def overlay(image: np.ndarray, full_map: np.ndarray) -> np.ndarray:
    """The jet heat map of a map at the image's size over the image (uint8 RGB [H,W,3])."""
    return heatmap_overlay(image, np.clip(full_map, 0, 1))


def binary_mask(full_map: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels of the map above ``threshold`` -> uint8 [H, W] with values 0/255."""
    return ((full_map > threshold) * 255).astype(np.uint8)


def scores_csv(rows: list[dict]) -> str:
    """The text of scores.csv: a header of ``SCORE_FIELDS``, then one line per row."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(SCORE_FIELDS))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


class OutputWriter:
    """Writes ``overlays/<name>.png`` (at the input's size), with a threshold ``masks/<name>.png``
    (0/255, the input's size), with ``save_maps`` ``maps/<name>.npy`` (the model's resolution),
    and ``scores.csv``; every file atomically."""

    def __init__(self, out: Path, threshold: float | None = None, save_maps: bool = False):
        self.out, self.threshold, self.save_maps = Path(out), threshold, save_maps

    def write(self, name: str, prediction: Prediction) -> None:
        image = np.asarray(read_rgb(prediction.path))  # [H, W, 3]
        full = full_size(prediction.amap, image.shape[1::-1])
        write_png(self.out / "overlays" / f"{name}.png", overlay(image, full))
        if self.threshold is not None:
            write_png(self.out / "masks" / f"{name}.png", binary_mask(full, self.threshold))
        if self.save_maps:
            buf = io.BytesIO()
            np.save(buf, prediction.amap)
            atomic_write(self.out / "maps" / f"{name}.npy", buf.getvalue())

    def write_scores(self, rows: list[dict]) -> Path:
        return atomic_write(self.out / "scores.csv", scores_csv(rows))


class Shard:
    """This process's share of the inputs under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK), or
    all of them in a plain run.

    Process r takes a contiguous block of the input list and writes those outputs itself;
    :meth:`gather` brings every process's (small) results to all of them, over gloo (CPU
    objects only, whatever device the model runs on).
    """

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.main = self.rank == 0

    def __enter__(self) -> "Shard":
        if self.world > 1:
            dist.init_process_group("gloo")
        return self

    def __exit__(self, *exc) -> None:
        if self.world > 1:
            dist.destroy_process_group()

    def indices(self, n: int, batch_size: int) -> range:
        """Positions in the input list of this process's block: whole batches of a plain run
        (their counts differ by at most 1), so every image meets the same batch neighbours and
        gets the same numbers as in a plain run."""
        batches = -(-n // batch_size)
        first, last = (min(n, r * batches // self.world * batch_size)
                       for r in (self.rank, self.rank + 1))
        return range(first, last)

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order (``[obj]`` in a plain run)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
