"""Scoring strategies: how a group of images (a product in test.py, a folder in predict.py and
on the page) is scored beyond the two zero-shot maps (docs/scoring.md).

A strategy turns the runtime's outputs for a group into one patch-score map per image, which
``fuse_maps`` joins with both zero-shot branches before the usual blend and score, and may give
the group's image scores in place of the protocol's top-k score (MuSc's RsCIN). Zero-shot
scoring (the paper's) is the strategy with no patch map: its numbers are the zero-shot path's,
bit for bit.

Adding one is one module in this package (imported here by itself) with a ``@register``ed
subclass of ``Strategy``: a ``name``, an ``Options`` dataclass (each field one setting; the front
ends offer it as the flag ``--<field>``, with the field's ``help`` metadata; a tuple default
takes one or more values) and ``group``, which returns a ``GroupScorer`` (docs/scoring.md,
"Adding a strategy"). With tiled inference (``utils/inference/tiling.py``) the group's images
are its images' tiles; a strategy that reads images of its own (references) cuts them by the
``tiling`` it is given. The pure tensor arithmetic belongs in ``model/``
(``model/patch_scoring.py``, ``model/musc.py``, ``model/coreset.py``).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from utils.errors import UsageError
from utils.inference.runtime import Runtime, RuntimeOutput
from utils.inference.tiling import Tiling
from utils.scoring.fusion import FUSIONS, fuse_maps

__all__ = ["GroupScorer", "Context", "Strategy", "STRATEGIES", "register", "make_strategy",
           "FUSIONS", "fuse_maps", "ZeroShot"]


class GroupScorer:
    """Scores the images of one group, fed batch by batch in order."""

    def add(self, output: RuntimeOutput, rows: list[int]) -> None:
        """The rows ``rows`` of a batch's ``output`` belong to this group."""
        raise NotImplementedError

    def patch_maps(self) -> np.ndarray | None:
        """[N,S,S] float32 patch-score maps of the images added, in order; None: no patch map
        (the zero-shot maps are used as they are)."""
        raise NotImplementedError

    def image_scores(self, raw: np.ndarray, new: np.ndarray) -> np.ndarray | None:
        """[N] float32 image scores of the group from its fused maps ``raw``, ``new`` [N,S,S]
        (after ``patch_maps``); None (the default): the protocol's top-k score of those maps."""
        return None


@dataclass
class Context:
    """What a strategy may use besides the group's own outputs."""

    runtime: Runtime
    image_size: int
    # the normal reference images: the same for every group, or a group's (a function of its name)
    references: list[Path] | Callable[[str], list[Path]] | None = None
    batch_size: int = 8
    # what ``Strategy.memory`` gave for these ``references`` (a list) cut by the tiling given to
    # ``prepare``, earlier, in another process maybe (a product profile's cache): used as it is
    memory: list | None = None


@dataclass(frozen=True)
class NoOptions:
    pass


class Strategy:
    """One way of scoring groups; ``options`` its settings, checked when it is made."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    patch_map: ClassVar[bool] = True  # False: the zero-shot maps as they are
    needs_references: ClassVar[bool] = False

    def __init__(self, options=None, context: Context | None = None, fusion: str = FUSIONS[0]):
        self.options = options if options is not None else self.Options()
        self.context, self.fusion = context, fusion
        self.check()
        if self.patch_map and context is not None and not context.runtime.has_features:
            raise UsageError(f"{self.name} scoring reads the patch tokens, which this runtime "
                             "does not give (an exported graph has only the zero-shot maps)")

    def check(self) -> None:
        """Raise ``UsageError(option=<field>)`` for a setting out of range."""

    @property
    def min_images(self) -> int:
        """Images that a group needs (mutual scoring: enough for MSM to average one distance)."""
        return 1

    def check_sizes(self, sizes: dict[str, int], kind: str) -> None:
        """Raise ``UsageError`` naming the groups of ``sizes`` (name -> its images; ``kind``: what
        a group is, a folder or a product) too small for this scoring, before any model work."""

    def prepare(self, tiling: Tiling | None = None) -> None:
        """Work that can fail on the user's inputs, done before any image is read (reading the
        references that every group shares, cut by ``tiling``, say)."""

    def group(self, name: str, tiling: Tiling | None = None) -> GroupScorer:
        """The scorer of the group ``name``, whose images are cut by ``tiling`` (None: whole)."""
        raise NotImplementedError

    @property
    def memory(self) -> list | None:
        """What ``prepare`` built from the references that every group shares, to be kept and
        given back as ``Context.memory`` (per tapped layer a tensor); None: nothing."""
        return None

    def memory_bytes(self, references: int) -> int:
        """Bytes that ``prepare`` keeps for that many references (at most); tiled, count the
        references' tiles (``tiling.tiles_of``)."""
        return 0

    def describe(self) -> dict:
        """What metrics.json and the page say of this scoring (None-free JSON)."""
        return {"scoring": self.name, "fusion": self.fusion,
                **{f.name: getattr(self.options, f.name) for f in fields(self.options)}}

    def finish(self, raw: np.ndarray, new: np.ndarray, patch: np.ndarray | None,
               scorer: GroupScorer) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """A group's zero-shot maps [N,S,S] fused with its patch maps ``patch`` [N,S,S] (its
        ``scorer.patch_maps()``; None: the maps as they are), and the image scores [N] that
        replace the protocol's top-k score where the scorer gives them (else None)."""
        if patch is None:
            return raw, new, None
        raw, new = fuse_maps(raw, new, patch, self.fusion)
        return raw, new, scorer.image_scores(raw, new)


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Make a strategy known to every front end by its ``name``."""
    if cls.name in STRATEGIES:
        raise ValueError(f"a scoring strategy {cls.name!r} is registered already")
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(name: str, settings: dict, context: Context | None = None,
                  fusion: str = FUSIONS[0]) -> Strategy:
    """The strategy ``name`` with its options read from ``settings`` (e.g. the flags' values;
    keys that are not its options are ignored)."""
    if name not in STRATEGIES:
        raise UsageError(f"{name!r}: expected one of {', '.join(STRATEGIES)}", option="scoring")
    cls = STRATEGIES[name]
    options = cls.Options(**{f.name: tuple(settings[f.name]) if isinstance(f.default, tuple)
                             else settings[f.name] for f in fields(cls.Options)
                             if settings.get(f.name) is not None})
    return cls(options, context, fusion)


class _NoPatchMap(GroupScorer):
    def add(self, output: RuntimeOutput, rows: list[int]) -> None:
        pass

    def patch_maps(self) -> None:
        return None


@register
class ZeroShot(Strategy):
    """The paper's scoring: the two zero-shot maps alone."""

    name = "zero_shot"
    patch_map = False

    def group(self, name: str, tiling: Tiling | None = None) -> GroupScorer:
        return _NoPatchMap()

    def describe(self) -> dict:
        return {"scoring": self.name}


# the strategies beyond zero-shot: every module of this package, imported here, registers its own
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
