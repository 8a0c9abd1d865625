"""The meta file of a standardized dataset, ``meta_<name>.json`` (docs/reproduction.md §9)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from dataset.common import (Problems, check_dataset_name, list_images,
                            list_subdirs)
from dataset.products import FIXED_PRODUCT_ORDERS
from utils.files import atomic_write

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
