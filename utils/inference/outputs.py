"""What a prediction writes: the heat-map overlay and the thresholded mask at the image's size,
the map itself, and scores.csv; every file atomically."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from utils.files import atomic_write
from utils.data.images import read_rgb
from utils.inference.prediction import Prediction
from utils.evaluation.visualize import heatmap_overlay, write_png

__all__ = ["SCORE_FIELDS", "capped_size", "full_size", "overlay", "binary_mask", "scores_csv",
           "OUTPUTS", "OutputWriter"]

SCORE_FIELDS = ("path", "image_score", "max_pixel_score")


def capped_size(size: tuple[int, int], side: float) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, so that neither is over ``side``."""
    scale = min(1.0, side / max(size))
    return size if scale == 1.0 else (max(1, round(size[0] * scale)),
                                      max(1, round(size[1] * scale)))


def full_size(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map [h, w] (S x S, or stitched from tiles) resized bilinearly to an image's (width,
    height) -> [H, W] float32."""
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


OUTPUTS = ("overlays", "masks", "maps", "scores.csv", "progress")  # what predict.py writes


class OutputWriter:
    """Writes ``overlays/<name>.png`` (at the input's size, scaled down to ``max_side`` a side
    where it is larger), with a threshold ``masks/<name>.png`` (0/255, the overlay's size), with
    ``save_maps`` ``maps/<name>.npy`` (the prediction's map: the model's resolution, or the
    stitched map of a tiled run), and ``scores.csv``; every file atomically. The image is read
    as a viewer shows it (EXIF orientation), as the prediction read it."""

    def __init__(self, out: Path, threshold: float | None = None, save_maps: bool = False,
                 max_side: float = math.inf):
        self.out, self.threshold, self.save_maps = Path(out), threshold, save_maps
        self.max_side = max_side

    def write(self, name: str, prediction: Prediction) -> None:
        picture = read_rgb(prediction.path)
        size = capped_size(picture.size, self.max_side)
        if size != picture.size:  # reduce first: no full-size copy of a huge image
            picture = picture.reduce(max(1, int(max(picture.size) // self.max_side))).resize(
                size, Image.BILINEAR)
        image = np.asarray(picture)  # [H, W, 3]
        full = full_size(prediction.amap, size)
        write_png(self.out / "overlays" / f"{name}.png", overlay(image, full))
        if self.threshold is not None:
            write_png(self.out / "masks" / f"{name}.png", binary_mask(full, self.threshold))
        if self.save_maps:
            buf = io.BytesIO()
            np.save(buf, prediction.amap)
            atomic_write(self.out / "maps" / f"{name}.npy", buf.getvalue())

    def write_scores(self, rows: list[dict]) -> Path:
        return atomic_write(self.out / "scores.csv", scores_csv(rows))
