"""A plain folder of normal and anomalous test images (ours), e.g. your own product photos.

Source layout, per product folder::

    <product>/good/*.png              normal images                       (optional)
    <product>/anomaly/*.png           anomalous images                    (optional)
    <product>/masks/<stem>.png        mask of anomaly/<stem>.* (or <stem>_mask.*, any image type)
    <product>/train/*.png             normal training images, e.g. few-shot references (optional)

``<src>`` is either a folder of such product folders (each non-hidden sub-folder is a product,
sorted; each needs ``good/`` or ``anomaly/``), or a single product folder itself (``<src>/good``
or ``<src>/anomaly`` exists; the product is then named after ``<src>``).  ``good/`` and
``anomaly/`` go to ``test/``; ``train/``, if there is one, to ``train/good`` (else it stays empty).
Processing order per product is ``anomaly/`` then ``good/`` (sorted folder names, as MVTec-AD),
images sorted; every product's ``train/`` comes after all test images (so that adding one renames
no test image: the running id is the dataset's).  Output names:
``{name}_anomaly_{id}.bmp`` (+ mask ``.png``), ``{name}_good_{id}.bmp`` and ``{name}_{id}.bmp``
(train, as MVTec-AD's).

Masks: source value > 128 is anomalous by default (0/255 masks, anti-aliased edges), change it
with ``mask_threshold`` (e.g. 0 for class-id masks).  Every anomalous image needs a mask: a missing
one is an error, because an invented mask (all anomalous or all normal) would silently distort the
pixel metrics.  With ``allow_missing_masks`` an image without a mask gets an all-zero mask; only
its image-level scores are then meaningful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from dataset.common import (IMAGE_EXTENSIONS, TEST_ANOMALY, TEST_GOOD, TRAIN_GOOD, Item,
                            MaskFolder, Plan, Problems, list_images, list_subdirs)

GOOD, ANOMALY, MASKS, TRAIN = "good", "anomaly", "masks", "train"
MASK_SUFFIXES = ("", "_mask")
DEFAULT_THRESHOLD = 128


def find_products(src: Path, problems: Problems) -> dict[str, Path]:
    """``{product: folder}`` in sorted order; ``src`` itself when it is a product folder."""
    if not problems.require_dir(src, "dataset source root"):
        return {}
    if (src / GOOD).is_dir() or (src / ANOMALY).is_dir():
        return {src.resolve().name: src}
    products = {}
    for name in list_subdirs(src):
        if (src / name / GOOD).is_dir() or (src / name / ANOMALY).is_dir():
            products[name] = src / name
        else:
            problems.add(f"missing folder {src / name / GOOD} or {src / name / ANOMALY} "
                         f"(images of product {name!r})")
    if not products and not problems.lines:
        problems.add(f"no product folders in {src} (expected <product>/good or <product>/anomaly)")
    return products


def plan_product(product: str, folder: Path, allow_missing_masks: bool,
                 problems: Problems) -> list[Item]:
    """Test items of one product: anomalous images (with masks) first, then normal ones."""
    items = []
    anomaly_dir = folder / ANOMALY
    anomalous = [anomaly_dir / n for n in list_images(anomaly_dir)] if anomaly_dir.is_dir() else []
    masks: Optional[MaskFolder] = None
    if anomalous and (folder / MASKS).is_dir():
        masks = MaskFolder(folder / MASKS)
    elif anomalous and not allow_missing_masks:
        problems.add(f"missing folder {folder / MASKS} (masks of {anomaly_dir})")
    for image in anomalous:
        mask = None
        if masks is not None:
            mask = masks.find(image, MASK_SUFFIXES, IMAGE_EXTENSIONS, problems,
                              required=not allow_missing_masks)
        items.append(Item(product, TEST_ANOMALY, ANOMALY, image, mask))
    good_dir = folder / GOOD
    if good_dir.is_dir():
        items += [Item(product, TEST_GOOD, GOOD, good_dir / n) for n in list_images(good_dir)]
    return items


def plan_train(product: str, folder: Path) -> list[Item]:
    """The product's normal training images (``train/``, optional)."""
    train_dir = folder / TRAIN
    if not train_dir.is_dir():
        return []
    return [Item(product, TRAIN_GOOD, "", train_dir / n) for n in list_images(train_dir)]


def plan(src: Path, name: str, mask_threshold: Optional[int] = None,
         allow_missing_masks: bool = False) -> Plan:
    """Plan the conversion of a plain good/anomaly folder; raises DataError on problems."""
    src = Path(src)
    problems = Problems()
    products = find_products(src, problems)
    items = []
    for product, folder in products.items():
        items += plan_product(product, folder, allow_missing_masks, problems)
    for product, folder in products.items():  # after every test image
        items += plan_train(product, folder)
    problems.raise_if_any(f"cannot convert {name!r} from {src}")
    threshold = DEFAULT_THRESHOLD if mask_threshold is None else mask_threshold
    return Plan(name, tuple(products), items, threshold)
