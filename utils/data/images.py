"""Finding and decoding images: the one list of image extensions, inputs given as files, folders
or globs, and a ``Dataset`` of image files that reports unreadable ones instead of failing."""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from utils.data.dataset import image_transform
from utils.errors import UsageError

__all__ = ["IMAGE_EXTENSIONS", "expand_inputs", "read_rgb", "unique_names", "folder_groups",
           "image_batches"]

# Image files that the project reads, compared case-insensitively (VisA uses .JPG): dataset
# conversion, predict.py and the page pick up the same files.
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders' image files (sorted), glob matches (sorted); each path once."""
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
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
        return im if im.mode == "RGB" else im.convert("RGB")  # no copy of a big RGB image


def unique_names(paths: list[Path]) -> list[str]:
    """Output names: the file stem, with _1, _2, ... where stems repeat."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return names


def folder_groups(paths: list[Path]) -> list[list[int]]:
    """Indices of the inputs grouped by folder; folders in order of their first input."""
    groups: dict[Path, list[int]] = {}
    for i, path in enumerate(paths):
        groups.setdefault(path.parent, []).append(i)
    return list(groups.values())


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


def image_batches(paths: list[Path], image_size: int, batch_size: int,
                  num_workers: int = 0) -> DataLoader:
    """Batches ``(indices, images [B,3,S,S] or None, [(index, reason), ...])`` of the files in
    order, preprocessed as the test images are (docs/reproduction.md §1); a file that cannot be
    read is one ``(index, reason)`` of its batch."""
    return DataLoader(_Images(paths, image_size), batch_size=batch_size,
                      num_workers=num_workers, collate_fn=_collate)
