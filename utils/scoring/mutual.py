"""MuSc's mutual scoring (no labels, ``model/musc.py``): every patch against the other images of
its group, on LNAMD-aggregated raw tokens (MSM), and the images re-scored by their neighbours
(RsCIN). The group's raw tokens and image embeddings are held until it is complete."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from model.musc import MSM_FRACTION, MUSC_R, RSCIN_K, msm_min_images, musc_scores, rscin
from model.patch_scoring import score_map
from utils.errors import UsageError
from utils.evaluation.metrics import max_blend_scores
from utils.inference.runtime import RuntimeOutput
from utils.scoring import GroupScorer, Strategy, register

__all__ = ["Mutual"]


@dataclass(frozen=True)
class MutualOptions:
    mutual_fraction: float = field(default=MSM_FRACTION, metadata={
        "help": "MSM: a patch's score is the mean of this smallest fraction of its nearest "
                "distances to the other images (default %(default)s, MuSc's)"})
    mutual_r: tuple[int, ...] = field(default=MUSC_R, metadata={
        "help": "LNAMD: average each patch's features over its r x r neighbourhood, for each "
                "odd r given; the scores are averaged over them (default 1 3 5, MuSc's)"})
    rscin: tuple[int, ...] = field(default=RSCIN_K, metadata={
        "help": "RsCIN: re-score each image with its k most similar images of the group, for "
                "each k given, averaged (default 1 2 3, MuSc's for MVTec-AD; 1: off; a k "
                "above the group's size is taken as its size)"})


class _MutualMaps(GroupScorer):
    def __init__(self, options: MutualOptions, size: int):
        self.options, self.size = options, size
        self.tokens, self.embeddings = [], []  # per batch: per layer [b,1+L,C]; [b,E] on the CPU

    def add(self, output: RuntimeOutput, rows: list[int]) -> None:
        features = output.features
        self.tokens.append([t[rows] for t in features.raw_tokens])
        self.embeddings.append(features.image_features[rows].float().cpu())

    def patch_maps(self) -> np.ndarray:
        o = self.options
        with torch.inference_mode():  # one concatenated layer at a time: [N, 1+L, C] float32
            layers = (torch.cat([b[i] for b in self.tokens]).float()
                      for i in range(len(self.tokens[0])))
            scores = musc_scores(layers, o.mutual_fraction, o.mutual_r)  # [N, L]
            maps = score_map(scores, self.size).cpu().numpy()
        self.tokens = []
        return maps  # [N, S, S]

    def image_scores(self, raw: np.ndarray, new: np.ndarray) -> np.ndarray:
        """RsCIN of the maximum of each image's blended (fused) map, [N] float32."""
        scores = torch.from_numpy(max_blend_scores(raw, new))  # [N]
        k_list = [min(k, len(scores)) for k in self.options.rscin]
        with torch.inference_mode():
            return rscin(scores, torch.cat(self.embeddings), k_list).numpy()


@register
class Mutual(Strategy):
    """MuSc: per tapped layer and r, MSM on the LNAMD features of the group's raw tokens,
    averaged; the image scores re-scored by RsCIN."""

    name = "mutual"
    Options = MutualOptions

    def check(self) -> None:
        o = self.options
        if not 0 < o.mutual_fraction <= 1:
            raise UsageError(f"must be in (0, 1], got {o.mutual_fraction}",
                             option="mutual_fraction")
        if not o.mutual_r or any(r < 1 or r % 2 == 0 for r in o.mutual_r):
            raise UsageError(f"expected positive odd numbers, got {list(o.mutual_r)}",
                             option="mutual_r")
        if not o.rscin or min(o.rscin) < 1:
            raise UsageError(f"expected numbers >= 1, got {list(o.rscin)}", option="rscin")

    @property
    def min_images(self) -> int:
        return msm_min_images(self.options.mutual_fraction)

    def check_sizes(self, sizes: dict[str, int], kind: str) -> None:
        small = [f"{name} ({n})" for name, n in sizes.items() if n < self.min_images]
        if small:
            f = self.options.mutual_fraction
            raise UsageError(f"{f}: mutual scoring needs at least {self.min_images} images in "
                             f"each {kind} (MSM averages floor({f} (N - 1)) >= 1 of a patch's "
                             f"distances to the N - 1 other images); fewer in "
                             f"{', '.join(small)}", option="mutual_fraction")

    def group(self, name: str, tiling=None) -> GroupScorer:
        return _MutualMaps(self.options, self.context.image_size)  # tiles are images here
