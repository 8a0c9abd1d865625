"""Few-shot scoring: every patch against a memory of normal reference images' patches
(``model/patch_scoring.py:reference_score``), optionally subsampled to a greedy coreset
(``model/coreset.py``) so that many references keep a small memory. A group's memory is built
from its references when the group starts, and only the current group's is kept."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.coreset import coreset_size
from model.patch_scoring import reference_memory, reference_score, score_map
from utils.data.dataset import image_transform
from utils.errors import UsageError
from utils.data.images import read_rgb
from utils.inference.runtime import Runtime, RuntimeOutput
from utils.scoring import GroupScorer, Strategy, register

__all__ = ["Reference", "memory_of", "memory_bytes"]


@dataclass(frozen=True)
class ReferenceOptions:
    coreset: float = field(default=1.0, metadata={
        "help": "keep this fraction of the reference memory, per tapped layer, by greedy "
                "coreset subsampling (PatchCore's; e.g. 0.1 for many references; default 1.0: "
                "every patch)"})


def memory_of(paths: list[Path], runtime: Runtime, image_size: int, batch_size: int = 8,
              coreset: float = 1.0) -> list[torch.Tensor]:
    """The few-shot memory of normal reference images: per tapped layer, their normalized patch
    tokens [K*L, W] on the model's device, or the greedy coreset of ``coreset`` of them
    [m, W]. An unreadable reference is an error (it would silently weaken the memory).

    Built one layer at a time: besides the references' tokens, one layer's whole memory is
    alive while it is subsampled (``model/patch_scoring.py:reference_memory``)."""
    transform, images = image_transform(image_size), []
    for path in paths:
        try:
            images.append(transform(read_rgb(path)))  # [3, S, S]
        except Exception as e:
            raise UsageError(f"reference image {path}: cannot read it ({type(e).__name__}: {e})")
    batches = [runtime(torch.stack(images[start:start + batch_size])).features.patch_tokens
               for start in range(0, len(images), batch_size)]  # per batch, per layer [b, L, W]
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
        self._paths, self._memory = None, None  # the current memory and its references

    def check(self) -> None:
        if not 0 < self.options.coreset <= 1:
            raise UsageError(f"must be in (0, 1], got {self.options.coreset}", option="coreset")

    def prepare(self) -> None:
        c = self.context
        if isinstance(c.references, list):
            if c.memory is not None:
                self._paths, self._memory = c.references, c.memory
            self._memory_for(c.references)

    @property
    def memory(self) -> list[torch.Tensor] | None:
        return self._memory if isinstance(self.context.references, list) else None

    def memory_bytes(self, references: int) -> int:
        """float32 tokens of ``references`` images, each layer's coreset of them kept."""
        return memory_bytes(self.context.runtime, references, self.options.coreset)

    def group(self, name: str) -> GroupScorer:
        refs = self.context.references
        memory = self._memory_for(refs if isinstance(refs, list) else refs(name))
        return _ReferenceMaps(memory, self.context.image_size)

    def _memory_for(self, paths: list[Path]) -> list[torch.Tensor]:
        if paths != self._paths:
            c = self.context
            self._memory = None  # the old memory goes before the new one is built
            self._memory = memory_of(paths, c.runtime, c.image_size, c.batch_size,
                                     self.options.coreset)
            self._paths = paths
        return self._memory

    def describe(self) -> dict:
        return {"fusion": self.fusion, "coreset": self.options.coreset}
