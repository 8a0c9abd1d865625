"""One planner per original dataset layout; :func:`make_plan` picks one by layout name.

Layouts: ``mvtec`` (MVTec-AD), ``visa`` (VisA + split_csv/1cls.csv), ``mvtec_like`` (any dataset
in the MVTec-AD folder layout: MPDD, DTD-Synthetic, ...), ``btad`` (BTAD's ok/ko names) and
``folder`` (plain good/ + anomaly/ + masks/ folders).  Planning validates the whole source and
writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from dataset.common import Plan
from utils.errors import DataError

LAYOUTS = ("mvtec", "visa", "mvtec_like", "btad", "folder")

# The layout a dataset name implies when --layout is not given.
DEFAULT_LAYOUTS = {
    "mvtec": "mvtec", "visa": "visa", "btad": "btad", "mpdd": "mvtec_like",
    "dtd": "mvtec_like", "dtd-synthetic": "mvtec_like", "dtdsynthetic": "mvtec_like",
}

# MVTec-AD and VisA are defined by docs/reproduction.md §9 (fixed products, prefixes, thresholds):
# the names
# "mvtec" and "visa" always mean those layouts, and those layouts always write those names.
RESERVED = {"mvtec": "mvtec", "visa": "visa"}


def resolve_layout(name: str, layout: Optional[str] = None) -> str:
    """The layout to use for dataset ``name``; raises DataError for an impossible choice."""
    if layout is not None and layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    reserved = RESERVED.get(name.lower())
    if reserved and layout not in (None, reserved):
        raise DataError(f"dataset {name!r} is always converted with layout {reserved!r}, "
                           f"not {layout!r} (docs/reproduction.md §9 fixes its products and "
                           "file names)")
    if layout in RESERVED.values() and name != layout:
        raise DataError(f"layout {layout!r} writes the dataset {layout!r}; "
                           f"use --dataset {layout} (got {name!r})")
    if layout is None:
        layout = DEFAULT_LAYOUTS.get(name.lower())
    if layout is None:
        raise DataError(f"no default layout for dataset {name!r}: pass --layout "
                           f"({', '.join(LAYOUTS)})")
    return layout


def make_plan(name: str, src: Path, layout: Optional[str] = None,
              mask_threshold: Optional[int] = None, allow_missing_masks: bool = False) -> Plan:
    """Validate ``src`` as ``layout`` (default: implied by ``name``) and plan its conversion.

    ``mask_threshold`` overrides the default binarization of the mvtec_like/btad/folder layouts
    (MVTec-AD and VisA keep docs/reproduction.md §9's > 128 and > 0); ``allow_missing_masks`` is
    for ``folder``.
    """
    from dataset.layouts import folder, mvtec, mvtec_like, visa

    layout = resolve_layout(name, layout)
    if layout in RESERVED.values() and mask_threshold is not None:
        raise DataError(f"--mask_threshold cannot change the {layout!r} layout "
                           "(docs/reproduction.md §9 fixes its binarization)")
    if layout != "folder" and allow_missing_masks:
        raise DataError("--allow_missing_masks only applies to the 'folder' layout")
    if layout == "mvtec":
        return mvtec.plan(src)
    if layout == "visa":
        return visa.plan(src)
    if layout == "folder":
        return folder.plan(src, name, mask_threshold, allow_missing_masks)
    style = mvtec_like.BTAD_STYLE if layout == "btad" else mvtec_like.GENERIC_STYLE
    return mvtec_like.plan(src, name, style=style, mask_threshold=mask_threshold)
