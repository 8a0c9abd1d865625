"""Zero-shot segmentation of your own images: no masks, no meta file.

    python predict.py photos/ extra.jpg "more/*.png" --checkpoint_path vcp_weight/train_visa.pth \
        --save_path predictions --threshold 0.6 --save_maps

Writes ``overlays/<name>.png`` (heat map over the image), ``scores.csv`` (path, image score, max
pixel score), with ``--threshold`` ``masks/<name>.png`` (0/255, the input's size), with
``--save_maps`` ``maps/<name>.npy`` (the map at the model's resolution).

The map is the smoothed blend of SPEC §10, ``gaussian_filter(0.2*raw + 0.8*new, sigma=8)``,
**without** test.py's per-product min-max normalization: a value means the same on every image, so
a fixed threshold is a usable deployment setting (README, 'Predict').
"""
from __future__ import annotations

import argparse
import csv
import glob
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.cli import (INPUT_ERRORS, UsageError, add_model_flags, autocast, build_model, fail,
                       read_checkpoint_and_config, select_device)
from utils.data import image_transform
from utils.metrics import image_scores, smoothed_blend
from utils.visualize import heatmap_overlay

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Segment anomalies in your own images (no labels)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--checkpoint_path", default="./vcp_weight/train_visa.pth")
    p.add_argument("--save_path", default="./results/predict")
    p.add_argument("--threshold", type=float, default=None,
                   help="also write binary masks of map > T (T on the un-normalized map scale)")
    p.add_argument("--save_maps", action="store_true", help="also write each map as .npy")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=2)
    add_model_flags(p)
    return p.parse_args(argv)


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
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
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


class Images(Dataset):
    """Yields (index, image tensor) or (index, None) for a file that cannot be read."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.transform = paths, image_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(read_rgb(self.paths[i]))
        except Exception as e:  # a corrupt or unsupported file is skipped, not fatal
            return i, f"{type(e).__name__}: {e}"


def collate(items):
    good = [(i, x) for i, x in items if torch.is_tensor(x)]
    bad = [(i, x) for i, x in items if not torch.is_tensor(x)]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


def unique_names(paths: list[Path]) -> list[str]:
    """Output names: the file stem, with _1, _2, ... where stems repeat."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return names


def save_outputs(out: Path, name: str, source: Path, amap: np.ndarray, args) -> None:
    image = read_rgb(source)
    full = np.asarray(Image.fromarray(amap).resize(image.size, Image.BILINEAR))  # input size
    Image.fromarray(heatmap_overlay(np.asarray(image), np.clip(full, 0, 1))).save(
        out / "overlays" / f"{name}.png")
    if args.threshold is not None:
        Image.fromarray(((full > args.threshold) * 255).astype(np.uint8)).save(
            out / "masks" / f"{name}.png")
    if args.save_maps:
        np.save(out / "maps" / f"{name}.npy", amap)


def predict(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    paths = expand_inputs(args.inputs)
    if not paths:
        raise UsageError(f"no images found in {args.inputs}")
    payload, cfg = read_checkpoint_and_config(args, args.checkpoint_path)
    device = select_device(args)
    model = build_model(args, cfg, payload, device)
    out = Path(args.save_path)
    for sub, wanted in (("overlays", True), ("masks", args.threshold is not None),
                        ("maps", args.save_maps)):
        if wanted:
            (out / sub).mkdir(parents=True, exist_ok=True)
    names = unique_names(paths)
    loader = DataLoader(Images(paths, cfg.image_size), batch_size=args.batch_size,
                        num_workers=args.num_workers, collate_fn=collate)
    rows, failed = [], []
    with torch.inference_mode(), autocast(device, args.precision):
        for indices, images, bad in tqdm(loader, desc="predict", unit="batch"):
            for i, reason in bad:
                print(f"warning: skipped {paths[i]}: cannot read it ({reason})", file=sys.stderr)
                failed.append(str(paths[i]))
            if images is None:
                continue
            raw, new = (m.float().cpu().numpy() for m in model(images.to(device)).abnormal())
            maps, scores = smoothed_blend(raw, new), image_scores(raw, new)
            for i, amap, score in zip(indices, maps, scores):
                save_outputs(out, names[i], paths[i], amap, args)
                rows.append({"path": str(paths[i]), "image_score": float(score),
                             "max_pixel_score": float(amap.max())})
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "image_score", "max_pixel_score"])
        writer.writeheader()
        writer.writerows(rows)
    return rows, failed


def main(argv=None) -> int:
    try:
        rows, failed = predict(parse_args(argv))
    except INPUT_ERRORS as e:
        return fail(e)
    print(f"{len(rows)} images segmented, {len(failed)} skipped")
    for path in failed:
        print(f"  skipped: {path}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
