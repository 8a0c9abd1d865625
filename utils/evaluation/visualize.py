"""Visualization panels of docs/reproduction.md §10: image | heat map | map above the F1 threshold
| mask.

Images are uint8 RGB ``[H, W, 3]``, maps float ``[H, W]`` in [0, 1], masks ``[H, W]`` {0, 1}.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from utils.files import atomic_write

__all__ = ["PANEL_HEIGHT", "PANEL_GAP", "heatmap_overlay", "make_panel", "save_panel", "write_png",
           "png_bytes"]

PANEL_HEIGHT = 256  # every panel is resized to this height (docs/reproduction.md §10)
PANEL_GAP = 10  # white columns between panels
ALPHA = 0.5  # heat-map opacity over the image
CONTOUR_RGB = (0, 255, 0)  # ground-truth contours, green
CONTOUR_THICKNESS = 2


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 RGB [H, W, 3], got {image.dtype} {image.shape}")
    return image


def _check_plane(x, name: str, shape: tuple[int, int]) -> np.ndarray:
    x = np.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} (the image's H, W), got {x.shape}")
    return x


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Jet heat map of ``anomaly_map`` blended over ``image``.

    Args:
        image: uint8 RGB ``[H, W, 3]``.
        anomaly_map: float ``[H, W]`` in [0, 1] (clipped; NaN counts as 0).
        alpha: weight of the heat map (the image gets ``1 - alpha``).

    Returns:
        uint8 RGB ``[H, W, 3]``: ``alpha * jet(uint8(map * 255)) + (1 - alpha) * image``, rounded.
    """
    image = _check_image(image)
    m = _check_plane(anomaly_map, "anomaly_map", image.shape[:2]).astype(np.float32)
    m = np.clip(np.nan_to_num(m, nan=0.0), 0.0, 1.0)
    heat_bgr = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)  # [H, W, 3] BGR
    heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(heat, alpha, image, 1.0 - alpha, 0.0)


def _panel_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of a panel: height 256, width scaled to keep the aspect ratio."""
    return max(1, int(round(width * PANEL_HEIGHT / height))), PANEL_HEIGHT


def make_panel(
    image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, threshold: float
) -> np.ndarray:
    """The four-panel strip of one test image.

    Args:
        image: uint8 RGB ``[H, W, 3]``, the test image at the map's size.
        anomaly_map: float ``[H, W]`` in [0, 1] (the product-normalized pixel map).
        mask: ``[H, W]`` {0, 1} ground truth.
        threshold: the product's F1 threshold (nan keeps nothing in panel 3).

    Returns:
        uint8 RGB ``[256, 4 * W' + 30]`` with ``W' = round(W * 256 / H)``: (1) the image,
        (2) the jet heat map over it, (3) the map zeroed at or below ``threshold`` as a jet overlay
        with the ground-truth contours in green, (4) the mask as a jet overlay, each resized to
        256 px high (image and map bilinear, mask nearest) and separated by 10 px white columns.
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    anomaly_map = _check_plane(anomaly_map, "anomaly_map", (h, w)).astype(np.float32)
    mask = _check_plane(mask, "mask", (h, w))
    size = _panel_size(h, w)
    img = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)  # [256, W', 3]
    amap = cv2.resize(anomaly_map, size, interpolation=cv2.INTER_LINEAR)  # [256, W']
    gt = cv2.resize((mask > 0).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    kept = np.where(amap > threshold, amap, 0.0).astype(np.float32)  # nan threshold: all False
    thresholded = heatmap_overlay(img, kept)
    contours, _ = cv2.findContours(gt, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(thresholded, contours, -1, CONTOUR_RGB, CONTOUR_THICKNESS)
    mask_overlay = heatmap_overlay(img, gt.astype(np.float32))
    panels = [img, heatmap_overlay(img, amap), thresholded, mask_overlay]
    gap = np.full((PANEL_HEIGHT, PANEL_GAP, 3), 255, dtype=np.uint8)
    strip = [panels[0]]
    for p in panels[1:]:
        strip += [gap, p]
    return np.concatenate(strip, axis=1)


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 RGB ``[H,W,3]`` or grey ``[H,W]`` image encoded as PNG."""
    image = np.ascontiguousarray(image)
    ok, buf = cv2.imencode(".png", image if image.ndim == 2
                           else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"could not encode an image of shape {image.shape} as PNG")
    return buf.tobytes()


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write a uint8 RGB ``[H,W,3]`` or grey ``[H,W]`` image as PNG atomically (temporary file in
    the same folder, then rename).

    Parent folders are created. Returns the path.
    """
    return atomic_write(path, png_bytes(rgb))


def save_panel(
    path: str | os.PathLike,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """Build :func:`make_panel` and write it as PNG to ``path`` (atomically, parents created).

    Returns the uint8 RGB panel ``[256, 4 * W' + 30, 3]``.
    """
    panel = make_panel(image, anomaly_map, mask, threshold)
    write_png(path, panel)
    return panel
