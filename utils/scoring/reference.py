"""Few-shot scoring: every patch against a memory of normal reference images' patches
(``model/patch_scoring.py:reference_score``), optionally subsampled to a greedy coreset
(``model/coreset.py``) so that many references keep a small memory. A group's memory is built
from its references when the group starts, and only the current group's is kept. With tiled
inference the references are cut into tiles as the images are, and the memory holds the patches
of all their tiles."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.coreset import coreset_size
from model.patch_scoring import reference_memory, reference_score, score_map
from utils.data.images import tile_batches
from utils.errors import UsageError
from utils.inference.runtime import Runtime, RuntimeOutput
from utils.inference.tiling import Tiling, plan
from utils.scoring import GroupScorer, Strategy, register

__all__ = ["Reference", "memory_of", "memory_bytes"]


@dataclass(frozen=True)
class ReferenceOptions:
    coreset: float = field(default=1.0, metadata={
        "help": "keep this fraction of the reference memory, per tapped layer, by greedy "
                "coreset subsampling (PatchCore's; e.g. 0.1 for many references; default 1.0: "
                "every patch)"})


def memory_of(paths: list[Path], runtime: Runtime, image_size: int, batch_size: int = 8,
              coreset: float = 1.0, tiling: Tiling | None = None) -> list[torch.Tensor]:
    """The few-shot memory of normal reference images (their tiles, cut by ``tiling``): per
    tapped layer, their normalized patch tokens [K*L, W] (K images or tiles) on the model's
    device, or the greedy coreset of ``coreset`` of them [m, W]. An unreadable reference is an
    error (it would silently weaken the memory).

    Built one layer at a time: besides the references' tokens, one layer's whole memory is
    alive while it is subsampled (``model/patch_scoring.py:reference_memory``)."""
    boxes = [plan(path, tiling, image_size).boxes for path in paths]
    batches = []  # per batch, per layer [b, L, W]
    for _, images, bad in tile_batches(paths, boxes, image_size, batch_size):
        if bad:
            (k, _), reason = bad[0]
            raise UsageError(f"reference image {paths[k]}: {reason}")
        batches.append(runtime(images).features.patch_tokens)
    layers = [list(layer) for layer in zip(*batches)]  # per layer, per batch [b, L, W]
    del batches

    def stacked():  # [K, L, W], one layer at a time, its batches dropped once stacked
        while layers:
            yield torch.cat(layers.pop(0))
    with torch.inference_mode():
        return reference_memory(stacked(), coreset)


def memory_bytes(runtime: Runtime, references: int, coreset: float = 1.0) -> int:
    """Bytes of ``memory_of`` ``references`` images in float32 (its size in fp16 is half):
    per tapped layer the coreset of their L patch tokens of the backbone's width W."""
    model = runtime.model
    patches = (runtime.image_size // model.clip.cfg.patch_size) ** 2  # L
    kept = coreset_size(references * patches, coreset) if references else 0
    return len(model.cfg.features_list) * kept * model.clip.cfg.vision_width * 4


class _ReferenceMaps(GroupScorer):
    """Each batch's rows scored against the group's memory as they arrive."""

    def __init__(self, memory: list[torch.Tensor], size: int):
        self.memory, self.size, self.maps = memory, size, []

    def add(self, output: RuntimeOutput, rows: list[int]) -> None:
        tokens = [t[rows] for t in output.features.patch_tokens]  # per layer [b, L, W]
        with torch.inference_mode():
            scores = reference_score(tokens, self.memory)  # [b, L]
            self.maps.append(score_map(scores, self.size).cpu().numpy())  # [b, S, S]

    def patch_maps(self) -> np.ndarray:
        maps, self.maps = np.concatenate(self.maps), []
        return maps


@register
class Reference(Strategy):
    """1 - the best cosine of a patch to the reference memory, averaged over the tapped layers."""

    name = "reference"
    Options = ReferenceOptions
    needs_references = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._made_of, self._memory = None, None  # the current memory, (its references, tiling)
        self._tiling = None  # the shared references' tiling (``prepare``'s)

    def check(self) -> None:
        if not 0 < self.options.coreset <= 1:
            raise UsageError(f"must be in (0, 1], got {self.options.coreset}", option="coreset")

    def prepare(self, tiling: Tiling | None = None) -> None:
        c = self.context
        self._tiling = tiling
        if isinstance(c.references, list):
            if c.memory is not None:  # kept for these references cut by this tiling
                self._made_of, self._memory = (c.references, tiling), c.memory
            self._memory_for(c.references, tiling)

    @property
    def memory(self) -> list[torch.Tensor] | None:
        """The shared references' memory, cut by ``prepare``'s tiling (what a profile keeps)."""
        refs = self.context.references
        shared = isinstance(refs, list) and self._made_of == (refs, self._tiling)
        return self._memory if shared else None

    def memory_bytes(self, references: int) -> int:
        """float32 tokens of ``references`` images (their tiles, when tiled), each layer's
        coreset of them kept."""
        return memory_bytes(self.context.runtime, references, self.options.coreset)

    def group(self, name: str, tiling: Tiling | None = None) -> GroupScorer:
        refs = self.context.references
        memory = self._memory_for(refs if isinstance(refs, list) else refs(name), tiling)
        return _ReferenceMaps(memory, self.context.image_size)

    def _memory_for(self, paths: list[Path], tiling: Tiling | None) -> list[torch.Tensor]:
        if (paths, tiling) != self._made_of:
            c = self.context
            self._memory = None  # the old memory goes before the new one is built
            self._memory = memory_of(paths, c.runtime, c.image_size, c.batch_size,
                                     self.options.coreset, tiling)
            self._made_of = (paths, tiling)
        return self._memory

    def describe(self) -> dict:
        return {"fusion": self.fusion, "coreset": self.options.coreset}
