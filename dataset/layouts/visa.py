"""VisA (docs/reproduction.md §9), driven by ``<root>/split_csv/1cls.csv``.

Original: ``<root>/<product>/Data/{Images/{Normal,Anomaly}, Masks/Anomaly}`` and the CSV with
columns ``object, split, label, image, mask`` (paths relative to ``<root>``; ``label`` is
``normal`` or ``anomaly``; ``mask`` is empty for normal rows).  Products in the fixed VisA order;
per product the ``train`` rows, then the ``test`` rows, each in CSV order.  Output name
``visa_{stem}_{id}.bmp`` (stem = source file name without extension) under ``train/good``
(train rows), ``test/good`` (test, normal) or ``test/anomaly`` (test, anomaly, with the mask
``ground_truth/anomaly/visa_{stem}_{id}.png``, source value > 0 -> 255: VisA masks hold class ids).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from dataset.common import TEST_ANOMALY, TEST_GOOD, TRAIN_GOOD, Item, Plan, Problems
from dataset.products import VISA_PRODUCTS

NAME = "visa"
SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
MASK_THRESHOLD = 0  # docs/reproduction.md §9: VisA masks are binarized as value > 0


def read_split_csv(path: Path, problems: Problems) -> Optional[list[tuple[int, dict]]]:
    """``(line number, row)`` pairs of the split CSV; None (recorded) when a column is missing."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            problems.add(f"{path}: missing column(s) {', '.join(missing)} "
                         f"(expected {', '.join(COLUMNS)})")
            return None
        return [(reader.line_num, {k: (row[k] or "").strip() for k in COLUMNS}) for row in reader]


def row_item(src: Path, where: str, row: dict, problems: Problems) -> Optional[Item]:
    """The item of one CSV row, or None (with a recorded problem) when the row is unusable."""
    split, label = row["split"], row["label"]
    if label not in ("normal", "anomaly"):
        problems.add(f"{where}: expected label normal or anomaly, got {label!r}")
        return None
    image = src / row["image"]
    ok = problems.require_file(image, f"image of {where}")
    if split == "train":  # as the reference: every train row (1cls.csv: normal only) -> train/good
        dest, mask = TRAIN_GOOD, None
    elif label == "normal":
        dest, mask = TEST_GOOD, None
    else:
        dest = TEST_ANOMALY
        mask = src / row["mask"] if row["mask"] else None
        if mask is None:
            problems.add(f"{where}: anomalous image without a mask path")
            ok = False
        elif not problems.require_file(mask, f"mask of {where}"):
            ok = False
    return Item(row["object"], dest, image.stem, image, mask) if ok else None


def plan(src: Path) -> Plan:
    """Plan the VisA conversion; every product, the CSV, each image and mask must exist."""
    src = Path(src)
    problems = Problems()
    context = f"cannot convert {NAME!r} from {src}"
    if not problems.require_dir(src, "dataset source root"):
        problems.raise_if_any(context)
    present = {p for p in VISA_PRODUCTS if problems.require_dir(src / p, f"product {p!r}")}
    csv_path = src / SPLIT_CSV
    rows = read_split_csv(csv_path, problems) if problems.require_file(
        csv_path, "VisA split file") else None

    by_product: dict[str, dict[str, list]] = {p: {"train": [], "test": []} for p in VISA_PRODUCTS}
    for line, row in rows or []:
        where = f"{csv_path} line {line}"
        if row["object"] not in by_product:
            problems.add(f"{where}: unknown object {row['object']!r} "
                         f"(expected one of {', '.join(VISA_PRODUCTS)})")
        elif row["split"] not in ("train", "test"):
            problems.add(f"{where}: expected split train or test, got {row['split']!r}")
        elif row["object"] in present:  # a missing product folder is reported once, above
            by_product[row["object"]][row["split"]].append((where, row))
    if rows is not None:  # every present product needs rows
        for product in [p for p in VISA_PRODUCTS if p in present]:
            if not by_product[product]["train"] and not by_product[product]["test"]:
                problems.add(f"{csv_path}: no rows for product {product!r}")

    items = []
    # fixed order; train rows then test rows, CSV order (docs/reproduction.md §9)
    for product in VISA_PRODUCTS:
        for where, row in by_product[product]["train"] + by_product[product]["test"]:
            item = row_item(src, where, row, problems)
            if item is not None:
                items.append(item)
    problems.raise_if_any(context)
    return Plan(NAME, VISA_PRODUCTS, items, MASK_THRESHOLD)
