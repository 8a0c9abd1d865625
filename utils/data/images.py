"""Finding and decoding images: the one list of image extensions, inputs given as files, folders
or globs, images read as a viewer shows them (EXIF orientation applied), and the batches of
model inputs cut from image files (whole images or tiles) that report unreadable files instead of
failing."""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from utils.data.dataset import image_transform
from utils.errors import UsageError

__all__ = ["IMAGE_EXTENSIONS", "expand_inputs", "shown_size", "read_rgb", "unique_names",
           "folder_groups", "Box", "tile_batches"]

# Image files that the project reads, compared case-insensitively (VisA uses .JPG): dataset
# conversion, predict.py and the page pick up the same files.
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The images to inspect: files as given, folders' image files (sorted), glob matches
    (sorted), each path once; and what a folder or a glob held that is not inspected, each with
    the reason (another file type, a subfolder)."""
    found, ignored = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for entry in sorted(path.iterdir()):
                if entry.is_dir():
                    ignored.append((entry, "a folder inside a folder (folders are not searched "
                                           "further)"))
                elif entry.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(entry)
                else:
                    ignored.append((entry, f"not an image file name (expected one of "
                                           f"{', '.join(IMAGE_EXTENSIONS)})"))
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matches:
                raise UsageError(f"input {item!r} is not a file, a folder or a matching glob")
            found += [m for m in matches if m.is_file()]
            ignored += [(m, "a folder matched by a glob (give the folder itself to inspect its "
                            "images)") for m in matches if not m.is_file()]
    return list(dict.fromkeys(found)), list(dict.fromkeys(ignored))


ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> the transpose that shows the image upright (as Pillow's exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int:
    return im.getexif().get(ORIENTATION, 1)


def shown_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image as a viewer shows it (EXIF orientation applied), read off its
    header; None for a file that cannot be opened."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            turned = _orientation(im) in (5, 6, 7, 8)
    except Exception:  # reported, with its reason, when the file is read
        return None
    return (height, width) if turned else (width, height)


def read_rgb(path: Path) -> Image.Image:
    """Any common format as 8-bit RGB, as a viewer shows it: turned upright by its EXIF
    orientation; grey and 16-bit images are scaled, alpha is dropped."""
    with Image.open(path) as im:
        im.load()
        turn = _UPRIGHT.get(_orientation(im))
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            im = Image.fromarray(np.clip(a / top * 255.0, 0, 255).astype(np.uint8))
        im = im if im.mode == "RGB" else im.convert("RGB")  # no copy of a big RGB image
        return im if turn is None else im.transpose(turn)


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


Box = tuple[int, int, int, int]  # (left, top, right, bottom) pixels of the image as shown,
# right and bottom excluded


class _Tiles(Dataset):
    """Item k of ``items`` [(image, tile, box or None: the whole image)] -> ((image, tile),
    tensor [3, S, S]) of that crop, or ((image, tile), reason) where the file cannot be read. An
    image is decoded once for all its tiles that one process cuts in a row."""

    def __init__(self, paths: list[Path], items: list[tuple[int, int, Box | None]],
                 tiles: list[int], size: int):
        self.paths, self.items, self.tiles = paths, items, tiles
        self.transform = image_transform(size)
        self.decoded: tuple[int, Image.Image] | None = None  # (image, its pixels) being cut

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        i, t, box = self.items[k]
        try:
            if box is None:
                return (i, t), self.transform(read_rgb(self.paths[i]))
            if self.decoded is None or self.decoded[0] != i:
                self.decoded = None  # the last image goes before the next is decoded
                self.decoded = (i, read_rgb(self.paths[i]))
            tile = self.decoded[1].crop(box)
            if t == self.tiles[i] - 1:  # its last tile: let it go
                self.decoded = None
            return (i, t), self.transform(tile)
        except Exception as e:  # a corrupt or unsupported file is skipped, not fatal
            return (i, t), f"cannot read it ({type(e).__name__}: {e})"


def _collate(items):
    good = [(key, x) for key, x in items if torch.is_tensor(x)]
    bad = [(key, x) for key, x in items if not torch.is_tensor(x)]
    images = torch.stack([x for _, x in good]) if good else None  # [B, 3, S, S]
    return [key for key, _ in good], images, bad


def _batches(tiles: list[int], batch_size: int) -> list[list[int]]:
    """Item positions in batches of ``batch_size``, across images, starting afresh every
    ``batch_size`` images: each run of ``batch_size`` images is batched alike wherever a run of
    them starts (``predict.py --resume`` and ``torchrun`` start at such a run)."""
    batches, start = [], 0
    for first in range(0, len(tiles), batch_size):
        n = sum(tiles[first:first + batch_size])
        batches += [list(range(start + b, start + min(b + batch_size, n)))
                    for b in range(0, n, batch_size)]
        start += n
    return batches


def tile_batches(paths: list[Path], boxes: list[list[Box | None]], image_size: int,
                 batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches ``([(image, tile), ...], tiles [B,3,S,S] or None, [((image, tile), reason), ...])``
    of the crops ``boxes[image]`` of each file (``[None]``: the whole image), in order, each
    preprocessed as the test images are (docs/reproduction.md §1); a crop of a file that cannot
    be read is one ``((image, tile), reason)`` of its batch. With one whole image per file the
    batches are those of ``batch_size`` images."""
    items = [(i, t, box) for i, crops in enumerate(boxes) for t, box in enumerate(crops)]
    tiles = [len(crops) for crops in boxes]
    return DataLoader(_Tiles(paths, items, tiles, image_size),
                      batch_sampler=_batches(tiles, batch_size), num_workers=num_workers,
                      collate_fn=_collate)
