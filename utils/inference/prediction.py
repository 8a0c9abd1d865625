"""The prediction service: images -> maps -> one score map and an image score per image, for
``predict.py``, the inspection page and a notebook alike.

    predictor = Predictor(TorchRuntime.load(ModelSource(checkpoint=...), device))
    for result in predictor(paths):  # a Prediction, or a Skipped where a file cannot be read
        ...

The map is the smoothed blend of docs/reproduction.md §10, ``gaussian_filter(0.2*raw + 0.8*new,
sigma=8)``, **without** test.py's per-product min-max normalization: a value means the same on
every image, so a fixed threshold is a usable deployment setting. The image score is the mean of
the 2000 largest pixels of each branch, added (0 to 2), or the strategy's where it gives one
(mutual scoring: MuSc's RsCIN, in [0, 1] relative to the other images of the folder).

With a ``Tiling`` (``utils/inference/tiling.py``) each image is cut into overlapping square tiles
that the runtime sees as images (in batches across the images' tiles) and the tiles' two maps are
stitched into one pair over the whole image before the blend, so the map covers the image at the
tiles' resolution (capped at ``max_map_side``). The blend's sigma and the top-k count are those of
one tile's map, scaled to the stitched map's resolution (sigma 8 and 2000 pixels where nothing
caps it); the image score is always taken from the stitched maps. A scoring strategy sees the
tiles as images: references are tiled alike, mutual scoring scores a folder's tiles against each
other. Without a tiling an image is one tile, the image resized to the model's square input, and
the numbers are those of the untiled service, bit for bit.

How the maps are made is the runtime's business (``utils/inference/runtime.py``: PyTorch, ONNX
Runtime); how they are scored beyond zero-shot the strategy's (``utils/scoring``). With a strategy
that makes a patch map the images are scored folder by folder: a folder's maps are fused once all of
them are in (mutual scoring needs them all; the sum rule scales over the folder).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from utils.data.images import folder_groups, tile_batches
from utils.evaluation.metrics import SIGMA, TOP_K, image_scores, smoothed_blend
from utils.inference.runtime import Runtime
from utils.inference.tiling import (DEFAULT_OVERLAP, MAX_MAP_SIDE, Layout, Stitcher, Tiling, plan,
                                    tiles_of)
from utils.scoring import Context, Strategy, ZeroShot

__all__ = ["Prediction", "Skipped", "groups", "check_groups", "Predictor"]

@dataclass
class Prediction:
    """One image's result: ``amap`` [H, W] float32, at the model's resolution S x S untiled, the
    stitched map over the image tiled; ``tiles`` the tiles it took (1 untiled), ``size`` (width,
    height) of the image as shown."""

    index: int  # position in the input list
    path: Path
    amap: np.ndarray
    image_score: float
    tiles: int = 1
    size: tuple[int, int] | None = None

    @property
    def max_pixel_score(self) -> float:
        return float(self.amap.max())

    def row(self) -> dict:
        return {"path": str(self.path), "image_score": self.image_score,
                "max_pixel_score": self.max_pixel_score}


@dataclass
class Skipped:
    """An input that could not be read (corrupt, unsupported), or one that its group's scoring
    cannot score (its folder has too few readable images for mutual scoring): reported, never
    fatal. ``reason`` says which; ``tiles`` those it was planned to take."""

    index: int
    path: Path
    reason: str
    tiles: int = 1


def _prediction(index: int, path: Path, raw: np.ndarray, new: np.ndarray, layout: Layout,
                score: float | None = None) -> Prediction:
    """The prediction of one image from its two maps [H, W] (stitched): the blend at the scaled
    sigma, the top-k score at the scaled count where ``score`` is None."""
    sigma, top_k = SIGMA * layout.scale, max(1, round(TOP_K * layout.scale ** 2))
    amap = smoothed_blend(raw[None], new[None], sigma=sigma)[0]  # [H, W]
    if score is None:
        score = image_scores(raw[None], new[None], top_k=top_k)[0]
    return Prediction(index, path, amap, float(score), layout.tiles, layout.size)


def groups(paths: list[Path], strategy: Strategy) -> list[list[int]]:
    """Positions of the inputs scored together: folder by folder with a patch map, else all of
    them (batches then run across folders, as a plain zero-shot run batches them)."""
    if strategy.patch_map or not paths:
        return folder_groups(paths)
    return [list(range(len(paths)))]


def check_groups(paths: list[Path], strategy: Strategy, tiling: Tiling | None = None) -> None:
    """Fail before any model work where a group has fewer images (tiles, when tiled) than its
    scoring needs."""
    kind = "folder (its tiles count as images)" if tiling else "folder"
    strategy.check_sizes({str(paths[g[0]].parent): sum(tiles_of(paths[i], tiling) for i in g)
                          for g in groups(paths, strategy)}, kind)


class _Group:
    """The images of one group in flight: their layouts and the maps being stitched."""

    def __init__(self, group: list[int], members: list[Path], layouts: list[Layout]):
        self.group, self.members, self.layouts = group, members, layouts
        self.open: dict[int, Stitcher] = {}  # member -> its maps so far

    def stitched(self, keys: list[tuple[int, int]], raw: np.ndarray, new: np.ndarray,
                 scores: np.ndarray | None = None) -> Iterator[Prediction]:
        """Blend the tile maps ``raw``, ``new`` [B,S,S] of ``keys`` (member, tile) in; yield each
        image whose last tile is in (``scores`` [B]: its image score, untiled only)."""
        for r, (k, t) in enumerate(keys):
            stitcher = self.open.setdefault(k, Stitcher(self.layouts[k]))
            stitcher.add(t, raw[r], new[r])
            if stitcher.complete:
                del self.open[k]
                yield _prediction(self.group[k], self.members[k], *stitcher.maps(),
                                  self.layouts[k], None if scores is None else scores[r])


class Predictor:
    """A runtime and a scoring strategy as one function of image paths: each input, in input
    order within its group, as a ``Prediction`` or a ``Skipped``; tiled by ``tiling`` (None:
    whole images), the stitched maps at most ``max_map_side`` a side."""

    def __init__(self, runtime: Runtime, strategy: Strategy | None = None, batch_size: int = 8,
                 num_workers: int = 0, tiling: Tiling | None = None,
                 max_map_side: int = MAX_MAP_SIDE):
        self.runtime, self.batch_size, self.num_workers = runtime, batch_size, num_workers
        self.tiling, self.max_map_side = tiling, max_map_side
        self.strategy = strategy or ZeroShot(context=Context(runtime, runtime.image_size))
        self.strategy.prepare(tiling)

    def tiling_for(self, tile: int | None) -> Tiling | None:
        """A job's tiling: ``tile`` None: this predictor's; 0: whole images; SIDE: tiles of SIDE
        px (at this predictor's overlap)."""
        if tile is None:
            return self.tiling
        overlap = self.tiling.overlap if self.tiling else DEFAULT_OVERLAP
        return Tiling(tile, overlap) if tile else None

    def tile_count(self, paths: list[Path], tile: int | None = None) -> int:
        """The tiles the images ``paths`` take (their number, untiled)."""
        return sum(tiles_of(p, self.tiling_for(tile)) for p in paths)

    def map_bytes(self, path: Path, tile: int | None = None) -> int:
        """The bytes of the image's map (float32), read off its header."""
        h, w = plan(path, self.tiling_for(tile), self.runtime.image_size, self.max_map_side).shape
        return 4 * h * w

    def __call__(self, paths: list[Path], tile: int | None = None
                 ) -> Iterator[Prediction | Skipped]:
        """The inputs' results; ``tile`` as ``tiling_for`` takes it (a job's own setting)."""
        tiling = self.tiling_for(tile)
        for group in groups(paths, self.strategy):
            yield from self._group(paths, group, tiling)

    def _group(self, paths: list[Path], group: list[int],
               tiling: Tiling | None) -> Iterator[Prediction | Skipped]:
        members = [paths[i] for i in group]
        size = self.runtime.image_size
        run = _Group(group, members, [plan(p, tiling, size, self.max_map_side) for p in members])
        scorer = self.strategy.group(str(members[0].parent), tiling)
        raw, new, kept, failed = [], [], [], set()
        for keys, images, bad in tile_batches(members, [lay.boxes for lay in run.layouts], size,
                                              self.batch_size, self.num_workers):
            for (k, _), reason in bad:
                if k not in failed:  # its other tiles fail alike
                    failed.add(k)
                    yield Skipped(group[k], members[k], reason, run.layouts[k].tiles)
            if images is None:
                continue
            out = self.runtime(images)  # [b, S, S] maps
            if not self.strategy.patch_map:  # nothing to wait for: the maps as they come
                yield from run.stitched(keys, out.raw, out.new)
                continue
            scorer.add(out, list(range(len(keys))))
            raw.append(out.raw), new.append(out.new)
            kept += keys
        if not kept:
            return
        images = sorted({k for k, _ in kept})
        needed, have = self.strategy.min_images, len(kept) if tiling else len(images)
        if have < needed:
            what = "tiles" if tiling else "images"
            for k in images:
                yield Skipped(group[k], members[k], f"{self.strategy.name} scoring needs {needed} "
                              f"readable {what} in its folder, it has {have}",
                              run.layouts[k].tiles)
            return
        raw, new, scores = self.strategy.finish(np.concatenate(raw), np.concatenate(new),
                                                scorer.patch_maps(), scorer)
        yield from run.stitched(kept, raw, new, None if tiling else scores)
