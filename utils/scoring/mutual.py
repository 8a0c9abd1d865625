"""Mutual scoring (no labels): every patch against the other images of its group
(``model/patch_scoring.py:mutual_score``); the group's tokens are held until it is complete."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from model.patch_scoring import MUTUAL_FRACTION, mutual_score, score_map
from utils.errors import UsageError
from utils.runtime import RuntimeOutput
from utils.scoring import GroupScorer, Strategy, register

__all__ = ["Mutual"]


@dataclass(frozen=True)
class MutualOptions:
    mutual_fraction: float = field(default=MUTUAL_FRACTION, metadata={
        "help": "mutual score: mean of this smallest fraction of the nearest distances to the "
                "other images (default %(default)s, MuSc's)"})


class _MutualMaps:
    def __init__(self, fraction: float, size: int):
        self.fraction, self.size, self.tokens = fraction, size, []

    def add(self, output: RuntimeOutput, rows: list[int]) -> None:
        self.tokens.append([t[rows] for t in output.features.patch_tokens])  # per layer [b,L,W]

    def patch_maps(self) -> np.ndarray:
        with torch.inference_mode():  # one concatenated layer at a time: [N, L, W]
            layers = (torch.cat([b[i] for b in self.tokens]) for i in range(len(self.tokens[0])))
            maps = score_map(mutual_score(layers, self.fraction), self.size).cpu().numpy()
        self.tokens = []
        return maps  # [N, S, S]


@register
class Mutual(Strategy):
    """The mean of the smallest ``mutual_fraction`` of a patch's distances to the nearest patch
    of each other image of its group, averaged over the tapped layers."""

    name = "mutual"
    Options = MutualOptions
    min_images = 2

    def check(self) -> None:
        f = self.options.mutual_fraction
        if not 0 < f <= 1:
            raise UsageError(f"must be in (0, 1], got {f}", option="mutual_fraction")

    def group(self, name: str) -> GroupScorer:
        return _MutualMaps(self.options.mutual_fraction, self.context.image_size)

    def describe(self) -> dict:
        return {"mutual": True, "fusion": self.fusion,
                "fraction": self.options.mutual_fraction}
