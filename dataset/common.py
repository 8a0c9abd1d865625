"""Shared pieces of dataset preparation: the error type, the conversion plan, listing helpers.

A layout module (``dataset/layouts/*.py``) reads an original dataset and returns a :class:`Plan`:
the ordered list of images to write, each with its destination folder, its file-name label and
its source mask.  Planning checks everything it can without decoding images and reports every
problem at once (:class:`Problems`), so a bad source fails before anything is written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from utils.errors import DataError
from utils.data.images import IMAGE_EXTENSIONS

# Destination folders of the standardized layout, relative to <dst>/<dataset>/<product>/
# (docs/reproduction.md §9).
TRAIN_GOOD = "train/good"
TEST_GOOD = "test/good"
TEST_ANOMALY = "test/anomaly"
GT_ANOMALY = "ground_truth/anomaly"
LAYOUT_FOLDERS = (TRAIN_GOOD, TEST_GOOD, TEST_ANOMALY, GT_ANOMALY)

# Dataset names become the file-name prefix; docs/reproduction.md §9 reads dataset_name back as the
# prefix before
# the first "_", so a name must not contain "_" (and must be a plain folder name).
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


class Problems:
    """Collects problems during validation so that one error lists all of them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def require_dir(self, path: Path, what: str) -> bool:
        """Record a missing folder unless ``path`` is one; return whether it is."""
        if path.is_dir():
            return True
        self.add(f"missing folder {path} ({what})")
        return False

    def require_file(self, path: Path, what: str) -> bool:
        """Record a missing file unless ``path`` is one; return whether it is."""
        if path.is_file():
            return True
        self.add(f"missing file {path} ({what})")
        return False

    def raise_if_any(self, context: str) -> None:
        """Raise one :class:`DataError` listing every recorded problem, if there is any."""
        if not self.lines:
            return
        n = len(self.lines)
        header = f"{context}: {n} problem{'s' if n > 1 else ''}, nothing was written"
        raise DataError("\n".join([header] + [f"  - {line}" for line in self.lines]), self.lines)


@dataclass(frozen=True)
class Item:
    """One image to write.

    ``dest`` is one of TRAIN_GOOD / TEST_GOOD / TEST_ANOMALY; the output file is
    ``{prefix}_{label}_{id:06d}.bmp`` (``{prefix}_{id:06d}.bmp`` when ``label`` is empty).
    A TEST_ANOMALY item's mask goes to GT_ANOMALY under the same stem with ``.png``;
    ``mask=None`` there means "write an all-zero mask" (only the folder layout allows that).
    """

    product: str
    dest: str
    label: str
    image: Path
    mask: Optional[Path] = None


@dataclass
class Plan:
    """Everything the writer needs: names, product order, items in processing order."""

    name: str                     # dataset name = output folder = file-name prefix
    products: tuple[str, ...]     # output products, in processing order
    items: list[Item] = field(default_factory=list)
    mask_threshold: int = 128     # a mask pixel is anomalous when its value is > this


def check_dataset_name(name: str) -> None:
    """Raise :class:`DataError` unless ``name`` is letters, digits and '-' (no '_')."""
    if not _DATASET_NAME.match(name or ""):
        raise DataError(
            f"invalid dataset name {name!r}: use letters, digits and '-' only (no '_': the meta "
            "file takes dataset_name from the file-name prefix before the first '_', "
            "docs/reproduction.md §9)")


def is_hidden(name: str) -> bool:
    """Names we never treat as data: hidden entries and macOS archive debris."""
    return name.startswith(".") or name == "__MACOSX"


def list_subdirs(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not is_hidden(e.name))


def list_images(folder: Path) -> list[str]:
    """Sorted names of the image files in ``folder`` (other files are ignored)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if e.is_file() and not is_hidden(e.name)
                      and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


class MaskFolder:
    """The files of one mask folder, looked up by image stem (extension case ignored)."""

    def __init__(self, folder: Path):
        self.folder = folder
        with os.scandir(folder) as entries:
            self._by_lower = {e.name.lower(): e.name for e in entries if e.is_file()}

    def find(self, image: Path, suffixes: tuple[str, ...], extensions: tuple[str, ...],
             problems: Problems, required: bool = True) -> Optional[Path]:
        """The mask ``<stem><suffix><ext>`` of ``image``; at most one candidate may exist.

        Records a problem (and returns None) when there is more than one, or none and
        ``required``.
        """
        stem = image.stem
        candidates = [f"{stem}{suffix}{ext}" for suffix in suffixes for ext in extensions]
        found = sorted({self._by_lower[c.lower()] for c in candidates
                        if c.lower() in self._by_lower})
        if len(found) == 1:
            return self.folder / found[0]
        if not found:
            if required:
                exts = extensions[0] if len(extensions) == 1 else "{" + ",".join(extensions) + "}"
                expected = " or ".join(str(self.folder / f"{stem}{suffix}{exts}")
                                       for suffix in suffixes)
                problems.add(f"missing mask {expected} (of {image})")
        else:
            problems.add(f"ambiguous mask of {image}: {', '.join(found)} in {self.folder}")
        return None
