"""Write ``<data_path>/meta_<dataset>.json`` for a standardized dataset (docs/reproduction.md §9).

    python dataset/make_meta.py --data_path ./dataset/mvisa/data --dataset mvtec

Format: ``{"train": {product: [entry, ...]}, "test": {product: [entry, ...]}}`` with products
in the fixed order for ``mvtec`` / ``visa`` (sorted folder names for any other dataset), entries
ordered by sorted folder name (``anomaly`` before ``good``) then sorted file name, and each entry
``{img_path, mask_path, cls_name, specie_name, dataset_name, anomaly}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script from anywhere: make `dataset.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.common import (Problems, check_dataset_name, list_images,  # noqa: E402
                            list_subdirs)
from dataset.products import FIXED_PRODUCT_ORDERS  # noqa: E402
from utils.errors import DataError  # noqa: E402
from utils.files import atomic_write  # noqa: E402
from utils.paths import DEFAULT_DATA  # noqa: E402

DEFAULT_DATA_PATH = DEFAULT_DATA
PHASES = ("train", "test")


def meta_path(data_root, name: str) -> Path:
    """``<data_root>/meta_<name>.json``."""
    return Path(data_root) / f"meta_{name}.json"


def product_order(dataset_dir: Path, name: str, problems: Problems) -> list[str]:
    """The fixed order for mvtec / visa (each product required), else the sorted folders."""
    fixed = FIXED_PRODUCT_ORDERS.get(name)
    if fixed is None:
        return list_subdirs(dataset_dir)
    return [p for p in fixed if problems.require_dir(dataset_dir / p, f"product {p!r}")]


def phase_entries(dataset_dir: Path, name: str, product: str, phase: str,
                  problems: Problems) -> list[dict]:
    """Entries of ``<product>/<phase>``: folders sorted (anomaly < good), then files sorted."""
    entries = []
    phase_dir = dataset_dir / product / phase
    for specie in list_subdirs(phase_dir):
        anomaly = specie != "good"
        for file_name in list_images(phase_dir / specie):
            stem = os.path.splitext(file_name)[0]
            mask_path = ""
            if anomaly:  # the mask is the image name with .bmp -> .png (docs/reproduction.md §9)
                mask_path = f"{name}/{product}/ground_truth/{specie}/{stem}.png"
                problems.require_file(dataset_dir.parent / mask_path,
                                      f"mask of {phase_dir / specie / file_name}")
            entries.append({
                "img_path": f"{name}/{product}/{phase}/{specie}/{file_name}",
                "mask_path": mask_path,
                "cls_name": product,
                "specie_name": specie,
                "dataset_name": stem.split("_", 1)[0],  # file-name prefix before the first "_"
                "anomaly": int(anomaly),
            })
    return entries


def build_meta(data_root, name: str) -> dict:
    """The meta dict of ``<data_root>/<name>``; raises DataError listing every problem."""
    check_dataset_name(name)
    dataset_dir = Path(data_root) / name
    problems = Problems()
    context = f"cannot build meta_{name}.json from {dataset_dir}"
    if not problems.require_dir(dataset_dir, "standardized dataset; run make_dataset_new.py"):
        problems.raise_if_any(context)
    products = product_order(dataset_dir, name, problems)
    if not products:
        problems.add(f"no product folders in {dataset_dir}")
    meta: dict = {phase: {} for phase in PHASES}
    for product in products:
        present = [problems.require_dir(dataset_dir / product / phase, f"{phase} split")
                   for phase in PHASES]
        for phase, ok in zip(PHASES, present):
            meta[phase][product] = (
                phase_entries(dataset_dir, name, product, phase, problems) if ok else [])
    problems.raise_if_any(context)
    return meta


def write_meta(data_root, name: str) -> Path:
    """Build the meta dict and write it to ``meta_<name>.json`` atomically; return the path."""
    meta = build_meta(data_root, name)
    path = meta_path(data_root, name)
    atomic_write(path, json.dumps(meta, indent=4) + "\n")
    return path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default=DEFAULT_DATA_PATH,
                        help=f"standardized data root (default {DEFAULT_DATA_PATH})")
    parser.add_argument("--dataset", required=True,
                        help="dataset folder under --data_path (mvtec, visa, btad, ...)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (1 with a message for bad input)."""
    args = parse_args(argv)
    try:
        path = write_meta(args.data_path, args.dataset)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
