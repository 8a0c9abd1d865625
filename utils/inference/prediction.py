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

from utils.data.images import folder_groups, image_batches
from utils.evaluation.metrics import image_scores, smoothed_blend
from utils.inference.runtime import Runtime
from utils.scoring import Context, Strategy, ZeroShot

__all__ = ["Prediction", "Skipped", "groups", "check_groups", "Predictor"]


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
    """An input that could not be read (corrupt, unsupported), or one that its group's scoring
    cannot score (its folder has too few readable images for mutual scoring): reported, never
    fatal. ``reason`` says which."""

    index: int
    path: Path
    reason: str


def _predictions(indices: list[int], paths: list[Path], raw: np.ndarray, new: np.ndarray,
                 scores: np.ndarray | None = None) -> Iterator[Prediction]:
    """Predictions from the two abnormal maps [B,S,S] of the inputs ``indices`` and their image
    scores [B] (None: the top-k score of the maps)."""
    scores = image_scores(raw, new) if scores is None else scores
    for i, amap, score in zip(indices, smoothed_blend(raw, new), scores):
        yield Prediction(i, paths[i], amap, float(score))


def groups(paths: list[Path], strategy: Strategy) -> list[list[int]]:
    """Positions of the inputs scored together: folder by folder with a patch map, else all of
    them (batches then run across folders, as a plain zero-shot run batches them)."""
    if strategy.patch_map or not paths:
        return folder_groups(paths)
    return [list(range(len(paths)))]


def check_groups(paths: list[Path], strategy: Strategy) -> None:
    """Fail before any model work where a group has fewer images than its scoring needs."""
    strategy.check_sizes({str(paths[g[0]].parent): len(g) for g in groups(paths, strategy)},
                         "folder")


class Predictor:
    """A runtime and a scoring strategy as one function of image paths: each input, in input
    order within its group, as a ``Prediction`` or a ``Skipped``."""

    def __init__(self, runtime: Runtime, strategy: Strategy | None = None, batch_size: int = 8,
                 num_workers: int = 0):
        self.runtime, self.batch_size, self.num_workers = runtime, batch_size, num_workers
        self.strategy = strategy or ZeroShot(context=Context(runtime, runtime.image_size))
        self.strategy.prepare()

    def __call__(self, paths: list[Path]) -> Iterator[Prediction | Skipped]:
        for group in groups(paths, self.strategy):
            yield from self._group(paths, group)

    def _group(self, paths: list[Path], group: list[int]) -> Iterator[Prediction | Skipped]:
        members = [paths[i] for i in group]
        scorer = self.strategy.group(str(members[0].parent))
        raw, new, kept = [], [], []
        for indices, images, bad in image_batches(members, self.runtime.image_size,
                                                  self.batch_size, self.num_workers):
            for i, reason in bad:
                yield Skipped(group[i], members[i], reason)
            if images is None:
                continue
            out = self.runtime(images)  # [b, S, S] maps
            if not self.strategy.patch_map:  # nothing to wait for: the maps as they come
                yield from _predictions([group[i] for i in indices], paths, out.raw, out.new)
                continue
            scorer.add(out, list(range(len(indices))))
            raw.append(out.raw), new.append(out.new)
            kept += [group[i] for i in indices]
        if not kept:
            return
        needed = self.strategy.min_images
        if len(kept) < needed:
            for i in kept:
                yield Skipped(i, paths[i], f"{self.strategy.name} scoring needs {needed} readable "
                                           f"images in its folder, it has {len(kept)}")
            return
        raw, new, scores = self.strategy.finish(np.concatenate(raw), np.concatenate(new),
                                                scorer.patch_maps(), scorer)
        yield from _predictions(kept, paths, raw, new, scores)
