"""Converting an original dataset into the standardized layout (docs/reproduction.md §9): a plan
of every file, checked before anything is written, then written into place atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from dataset.common import check_dataset_name
from utils.errors import DataError
from utils.paths import DEFAULT_DATA
from dataset.layouts import make_plan
from dataset.writer import write_plan



def check_paths(src: Path, final: Path) -> None:
    """Refuse outputs that would overwrite, delete or sit inside the source."""
    src, final = src.resolve(), final.resolve()
    if final == src or final in src.parents or src in final.parents:
        raise DataError(f"output folder {final} overlaps the source {src}: replacing it would "
                           "delete or mix with the original data; choose another --dst_path")
    if final.exists() and not final.is_dir():
        raise DataError(f"output {final} exists and is not a folder")
    for parent in final.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"output parent {parent} exists and is not a folder")
            break


def convert(dataset: str, src_path, dst_path=DEFAULT_DATA, layout: Optional[str] = None,
            mask_threshold: Optional[int] = None, allow_missing_masks: bool = False,
            progress: bool = True) -> Path:
    """Convert ``src_path`` into ``dst_path/dataset`` and return that folder.

    Raises :class:`~dataset.common.DataError` (before writing anything) for a bad name, bad
    paths or a source with missing items; for an unreadable image it raises after removing the
    partial output, leaving any previous ``dst_path/dataset`` as it was.
    """
    check_dataset_name(dataset)
    src, dst = Path(src_path), Path(dst_path)
    check_paths(src, dst / dataset)
    plan = make_plan(dataset, src, layout, mask_threshold, allow_missing_masks)
    return write_plan(plan, dst, progress=progress)
