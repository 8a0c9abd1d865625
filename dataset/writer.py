"""Write a :class:`~dataset.common.Plan` as the standardized layout (docs/reproduction.md §9),
atomically.

* One running id per conversion, starting at 0, +1 per image in plan order, 6 digits.
* Images: ``cv2.imread(path, cv2.IMREAD_COLOR)`` then ``cv2.imwrite(.bmp)`` -- grey sources
  become 3-channel BMPs, exactly as the reference.
* Masks: PNG, 0/255, anomalous where the source value is > ``plan.mask_threshold``.
* Everything is written into a hidden temporary sibling folder that is renamed into place at the
  end; a failure removes it and leaves any previous output untouched.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from dataset.common import GT_ANOMALY, LAYOUT_FOLDERS, TEST_ANOMALY, Item, Plan
from utils.errors import DataError


def output_stem(prefix: str, label: str, index: int) -> str:
    """``{prefix}_{label}_{index:06d}``, or ``{prefix}_{index:06d}`` for an empty label."""
    parts = [prefix, label, f"{index:06d}"] if label else [prefix, f"{index:06d}"]
    return "_".join(parts)


def read_image(path: Path) -> np.ndarray:
    """BGR uint8 [H, W, 3]; grey sources are expanded to 3 channels (IMREAD_COLOR)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"cannot read image {path} (not an image OpenCV can decode)")
    return image


def read_binary_mask(path: Path, threshold: int) -> np.ndarray:
    """uint8 [H, W] mask with values 0/255: 255 where the source value is > ``threshold``.

    Read unchanged so that class-id masks (VisA: 1, 2, ...) and 16-bit masks keep their values;
    a multi-channel mask counts a pixel as anomalous when any colour channel is above threshold.
    """
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DataError(f"cannot read mask {path} (not an image OpenCV can decode)")
    if mask.ndim == 3:
        mask = mask[..., :3].max(axis=2)  # ignore an alpha channel
    return np.where(mask > threshold, 255, 0).astype(np.uint8)


def _write(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise DataError(f"cannot write {path}")


def write_item(item: Item, index: int, prefix: str, root: Path, threshold: int) -> None:
    """Write one image (and its mask for TEST_ANOMALY items) under ``root/<product>/``."""
    stem = output_stem(prefix, item.label, index)
    product_dir = root / item.product
    image = read_image(item.image)
    _write(product_dir / item.dest / f"{stem}.bmp", image)
    if item.dest != TEST_ANOMALY:
        return
    if item.mask is None:  # only the folder layout with allow_missing_masks plans this
        mask = np.zeros(image.shape[:2], np.uint8)
    else:
        mask = read_binary_mask(item.mask, threshold)
        if mask.shape != image.shape[:2]:
            raise DataError(f"mask {item.mask} is {mask.shape[1]}x{mask.shape[0]} but image "
                               f"{item.image} is {image.shape[1]}x{image.shape[0]}")
    _write(product_dir / GT_ANOMALY / f"{stem}.png", mask)


def replace_dir(new: Path, final: Path) -> None:
    """Move the finished folder ``new`` to ``final``, replacing (then deleting) an old ``final``."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        new.rename(final)
        shutil.rmtree(old)
    else:
        new.rename(final)


def write_plan(plan: Plan, dst_root: Path, progress: bool = True) -> Path:
    """Write ``plan`` to ``dst_root/plan.name`` (replacing it) and return that folder.

    Every product gets all four layout folders, even empty ones.  Raises :class:`DataError`
    for unreadable sources or mismatched masks; nothing is left behind in that case.
    """
    dst_root = Path(dst_root)
    dst_root.mkdir(parents=True, exist_ok=True)
    final = dst_root / plan.name
    tmp = dst_root / f".{plan.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for product in plan.products:
            for folder in LAYOUT_FOLDERS:
                (tmp / product / folder).mkdir(parents=True, exist_ok=True)
        bar = tqdm(plan.items, desc=f"converting {plan.name}", unit="img", disable=not progress)
        for index, item in enumerate(bar):  # the running id (docs/reproduction.md §9)
            write_item(item, index, plan.name, tmp, plan.mask_threshold)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
