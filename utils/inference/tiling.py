"""Tiled inference for high-resolution images (docs/predict.md, "High-resolution images"): the
grid of tiles an image is cut into, and the stitching of the tiles' maps into one map over the
whole image. Pure functions of sizes and arrays, and ``plan``, which reads an image's size off
its header; ``utils/inference/prediction.py`` runs them for every runtime, scoring strategy and
front end.

Coordinates: an image of ``W x H`` pixels as shown (EXIF orientation applied). Its tiles are
squares of ``t = min(SIDE, W, H)`` pixels (a square, so the model sees the image's proportions;
an image thinner than SIDE gets tiles of its thickness). Along each axis of length ``L`` the
tiles start at ``n`` positions spread evenly from 0 to ``L - t``, with ``n`` the fewest that keep
neighbours overlapping by at least ``overlap * t``: the first and last tiles lie on the image's
borders (the edge tiles are shifted inward, nothing is padded), and the grid covers the image
exactly. Each tile is resized to the model's ``S x S`` input, so its maps have ``S / t`` map
pixels per image pixel; the stitched map has that resolution, ``round(W S / t) x round(H S / t)``,
scaled down (aspect kept) so that its longer side is at most ``max_side``.

Stitching: a map pixel ``(u, v)`` has its centre at image point ``((u + 1/2) W / M_x, ...)``;
each tile's map is sampled there bilinearly (half-pixel centres; a sample never reaches past a
tile's outermost map pixels, except at the image's own border, where every tiling and the
untiled map clamp alike) and the samples are blended with weights that sum to 1 at every pixel:
per axis, 1 where one tile covers, linear ramps across each overlap (between the outermost
pixel centres of the two tiles there), normalized where more than two tiles meet; the 2-D weight
of a tile is the product of its column's and its row's. There is no ramp at the image's border
(no border band), and a map pixel covered by one tile alone takes that tile's value unchanged: a
grid of one tile over an ``S x S``-resized image is the untiled map, bit for bit.

The untiled prediction is the same stitching with ``whole(S)``: one tile, weight 1, the map at
``S x S`` (the image squashed to a square, the paper's protocol).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.data.images import Box, shown_size
from utils.errors import UsageError

__all__ = ["MAX_MAP_SIDE", "DEFAULT_OVERLAP", "MIN_SIDE", "Tiling", "Box", "starts", "grid",
           "map_shape", "Axis", "axis", "Layout", "whole", "layout", "plan", "tiles_of",
           "Stitcher"]

MAX_MAP_SIDE = 4096  # px: the longest side of a stitched map (predict.py's --max_output_side)
DEFAULT_OVERLAP = 0.25  # of a tile's side: neighbours share at least a quarter of a tile
MIN_SIDE = 16  # px: a smaller tile is a few pixels blown up to the model's input size


@dataclass(frozen=True)
class Tiling:
    """Square tiles of ``side`` pixels of the original image, neighbours overlapping by at least
    ``overlap`` of a tile's side."""

    side: int
    overlap: float = DEFAULT_OVERLAP

    def __post_init__(self):
        if not isinstance(self.side, int) or self.side < MIN_SIDE:
            raise UsageError(f"expected a tile side of at least {MIN_SIDE} pixels, got "
                             f"{self.side}", option="tile")
        if not 0 <= self.overlap < 1:
            raise UsageError(f"expected a fraction of the tile's side in [0, 1), got "
                             f"{self.overlap}", option="tile_overlap")


def starts(length: int, extent: int, overlap: float) -> list[int]:
    """Where the tiles of ``extent`` px start along an axis of ``length`` px (``extent <=
    length``): ``n`` starts spread evenly (rounded) from 0 to ``length - extent``, ``n`` the
    fewest whose spacing is at most ``extent * (1 - overlap)``."""
    if extent >= length:
        return [0]
    gaps = math.ceil(round((length - extent) / (extent * (1 - overlap)), 9))  # n - 1
    spread = ((2 * k * (length - extent) + gaps) // (2 * gaps) for k in range(gaps + 1))
    return list(dict.fromkeys(spread))  # an overlap near 1 on a short axis: no tile twice


def grid(size: tuple[int, int], tiling: Tiling) -> list[Box]:
    """The tiles of an image of ``size`` (width, height), row by row, each a square of
    ``min(tiling.side, width, height)`` px; they cover the image exactly."""
    width, height = size
    t = min(tiling.side, width, height)
    return [(x, y, x + t, y + t) for y in starts(height, t, tiling.overlap)
            for x in starts(width, t, tiling.overlap)]


def map_shape(size: tuple[int, int], extent: int, image_size: int,
              max_side: float) -> tuple[int, int]:
    """(height, width) of the stitched map of an image of ``size`` (width, height) cut into tiles
    of ``extent`` px whose maps are ``image_size`` px a side: ``image_size / extent`` map px per
    image px, scaled down, aspect kept, to at most ``max_side`` a side."""
    w, h = ((2 * n * image_size + extent) // (2 * extent) for n in size)  # round(n S / t)
    scale = min(1.0, max_side / max(w, h))
    if scale < 1:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    return h, w


@dataclass(frozen=True)
class Axis:
    """One axis of a layout: per tile along it, the map pixels it reaches (``span``, a range),
    their blend weights and where they sample the tile's map."""

    spans: list[tuple[int, int]]  # [first, last + 1) map pixels with a weight > 0
    weights: list[np.ndarray]  # per tile [last + 1 - first] float32 in (0, 1]
    lower: list[np.ndarray]  # per tile [..] int64: the tile-map pixel at or before the sample
    upper: list[np.ndarray]  # per tile [..] int64: the one after it (clamped to S - 1)
    frac: list[np.ndarray]  # per tile [..] float32 in [0, 1): the sample's distance from lower


def _weights(centres: np.ndarray, tile_starts: list[int], extent: int, length: int,
             image_size: int) -> np.ndarray:
    """[K, M] float64 blend weights of K tiles at M map pixel centres (image px), summing to 1
    over the tiles at every pixel (module docstring)."""
    margin = extent / (2 * image_size)  # half a tile-map pixel: its outermost centres
    lo = np.array([s + margin if s > 0 else -np.inf for s in tile_starts])
    hi = np.array([s + extent - margin if s + extent < length else np.inf
                   for s in tile_starts])
    ramp = np.ones((len(tile_starts), len(centres)))
    for k in range(len(tile_starts)):
        if k > 0:  # rising across the overlap with the tile before
            ramp[k] = np.minimum(ramp[k], _rise(centres, lo[k], hi[k - 1]))
        if k + 1 < len(tile_starts):  # falling across the overlap with the tile after
            ramp[k] = np.minimum(ramp[k], _rise(-centres, -hi[k], -lo[k + 1]))
    alone = ramp.sum(0) == 0  # overlaps thinner than a tile-map pixel: the deepest tile
    if alone.any():
        depth = np.minimum(centres[alone] - np.array(tile_starts)[:, None],
                           np.array(tile_starts)[:, None] + extent - centres[alone])
        ramp[:, alone] = depth == depth.max(0)
    return ramp / ramp.sum(0)


def _rise(x: np.ndarray, start: float, end: float) -> np.ndarray:
    """0 up to ``start``, 1 from ``end`` on, linear between (a step at ``start`` when
    ``end <= start``)."""
    if end <= start:
        return (x > start).astype(np.float64)
    return np.clip((x - start) / (end - start), 0.0, 1.0)


def axis(length: int, extent: int, tile_starts: list[int], map_length: int,
         image_size: int) -> Axis:
    """The axis of ``length`` image px with tiles of ``extent`` px at ``tile_starts``, its map
    ``map_length`` px, the tiles' maps ``image_size`` px."""
    u = np.arange(map_length, dtype=np.int64)
    weights = _weights((u + 0.5) * length / map_length, tile_starts, extent, length, image_size)
    spans, kept, lower, upper, frac = [], [], [], [], []
    for s, w in zip(tile_starts, weights):
        reached = np.flatnonzero(w)  # empty only for a tile narrower than a map pixel
        first, end = (int(reached[0]), int(reached[-1]) + 1) if len(reached) else (0, 0)
        spans.append((first, end))
        kept.append(w[first:end].astype(np.float32))
        # the sample's tile-map coordinate, exactly: ((2u + 1) L S - 2 s M S - t M) / (2 t M)
        v = u[first:end]
        num = (2 * v + 1) * length * image_size - 2 * s * map_length * image_size \
            - extent * map_length
        den = 2 * extent * map_length
        q = num // den
        f = (num - q * den) / den
        f[(q < 0) | (q >= image_size - 1)] = 0.0  # clamped at the image's border
        q = np.clip(q, 0, image_size - 1)
        lower.append(q)
        upper.append(np.minimum(q + 1, image_size - 1))
        frac.append(f.astype(np.float32))
    return Axis(spans, kept, lower, upper, frac)


@dataclass(frozen=True)
class Layout:
    """How one image is cut and stitched: ``boxes`` the crops its tiles are made of, row by row
    (``None``: the whole image, squashed to the model's size as untiled), ``shape`` (height,
    width) of its map, the tiles' ``columns`` and ``rows``, and ``scale``: map px per tile-map
    px (1 at the tiles' own resolution; below 1 where ``max_side`` caps the map)."""

    boxes: list[Box | None]
    shape: tuple[int, int]
    columns: Axis
    rows: Axis
    scale: float
    size: tuple[int, int] | None = None  # (width, height) of the image as shown, where known

    @property
    def tiles(self) -> int:
        return len(self.boxes)


def whole(image_size: int, size: tuple[int, int] | None = None) -> Layout:
    """The untiled layout: the image resized to ``image_size`` a side, one tile, weight 1."""
    one = axis(image_size, image_size, [0], image_size, image_size)
    return Layout([None], (image_size, image_size), one, one, 1.0, size)


def layout(size: tuple[int, int], tiling: Tiling, image_size: int, max_side: float) -> Layout:
    """The tiled layout of an image of ``size`` (width, height)."""
    width, height = size
    t = min(tiling.side, width, height)
    xs, ys = starts(width, t, tiling.overlap), starts(height, t, tiling.overlap)
    h, w = map_shape(size, t, image_size, max_side)
    scale = max(h, w) * t / (max(size) * image_size)
    return Layout([(x, y, x + t, y + t) for y in ys for x in xs], (h, w),
                  axis(width, t, xs, w, image_size), axis(height, t, ys, h, image_size), scale,
                  size)


def plan(path: Path, tiling: Tiling | None, image_size: int,
         max_side: float = MAX_MAP_SIDE) -> Layout:
    """How the image ``path`` is cut and stitched (its size read off the header; a file that
    cannot be opened is planned whole and reported when it is read)."""
    size = shown_size(path)
    if tiling is None or size is None:
        return whole(image_size, size)
    return layout(size, tiling, image_size, max_side)


def tiles_of(path: Path, tiling: Tiling | None) -> int:
    """The tiles the image ``path`` takes (1 untiled or unreadable), read off its header."""
    size = shown_size(path) if tiling else None
    return len(grid(size, tiling)) if size else 1


class Stitcher:
    """One image's two maps (``raw``, ``new``), tile by tile: ``add`` each tile's pair, in any
    order; once ``complete``, ``maps()`` gives them [H_m, W_m] float32."""

    def __init__(self, plan: Layout):
        self.plan, self.added = plan, 0
        self.raw = np.zeros(plan.shape, np.float32)
        self.new = np.zeros(plan.shape, np.float32)

    @property
    def complete(self) -> bool:
        return self.added == self.plan.tiles

    def add(self, tile: int, raw: np.ndarray, new: np.ndarray) -> None:
        """Blend tile ``tile``'s maps ``raw``, ``new`` [S, S] into the image's."""
        j, i = divmod(tile, len(self.plan.columns.spans))  # row, column
        cols, rows = self.plan.columns, self.plan.rows
        (u0, u1), (v0, v1) = cols.spans[i], rows.spans[j]
        weight = rows.weights[j][:, None] * cols.weights[i][None, :]  # [h, w]
        for canvas, tile_map in ((self.raw, raw), (self.new, new)):
            canvas[v0:v1, u0:u1] += weight * _sample(tile_map, rows, j, cols, i)
        self.added += 1

    def maps(self) -> tuple[np.ndarray, np.ndarray]:
        return self.raw, self.new


def _sample(tile_map: np.ndarray, rows: Axis, j: int, cols: Axis, i: int) -> np.ndarray:
    """The tile map [S, S] sampled bilinearly at the map pixels of row tile ``j`` and column tile
    ``i`` -> [h, w] float32 (a fraction of 0 takes the lower pixel as it is)."""
    fy = rows.frac[j][:, None]
    lines = tile_map[rows.lower[j]] * (1 - fy) + tile_map[rows.upper[j]] * fy  # [h, S]
    fx = cols.frac[i][None, :]
    return lines[:, cols.lower[i]] * (1 - fx) + lines[:, cols.upper[i]] * fx  # [h, w]
