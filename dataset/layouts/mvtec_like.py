"""Datasets in the MVTec-AD folder layout: MVTec-AD itself, MPDD, DTD-Synthetic, BTAD (mapped).

Source layout, per product folder ``<src>/<product>/``::

    train/<good>/*.png                  normal training images
    test/<good>/*.png                   normal test images
    test/<defect>/<stem>.png            anomalous test images, one folder per defect type
    ground_truth/<defect>/<stem><mask_suffix>.png

MVTec-AD, MPDD and DTD-Synthetic use ``<good>`` = ``good`` and ``_mask``; BTAD uses ``ok`` for
normal and ``ko`` for its single defect folder, and masks named like the image (``.png`` or
``.bmp``).  Processing order (docs/reproduction.md §9, as MVTec-AD): products in order, per product
the training
images (sorted), then the test folders (sorted), images sorted.  Output names:
``{name}_{id}.bmp`` (train), ``{name}_good_{id}.bmp`` (test normal),
``{name}_{defect}_{id}.bmp`` + mask ``.png`` (test anomalous).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from dataset.common import (IMAGE_EXTENSIONS, TEST_ANOMALY, TEST_GOOD, TRAIN_GOOD, Item,
                            MaskFolder, Plan, Problems, list_images, list_subdirs)


@dataclass(frozen=True)
class MvtecLikeStyle:
    """How a dataset spells the MVTec-AD layout."""

    good: str = "good"                                # normal folder in train/ and test/
    mask_suffixes: tuple[str, ...] = ("_mask",)       # <stem><suffix><ext> in ground_truth/<defect>
    mask_extensions: tuple[str, ...] = (".png",)
    default_threshold: int = 128                      # mask value > threshold is anomalous


# docs/reproduction.md §9: MVTec-AD masks are NNN_mask.png, binarized as value > 128.
MVTEC_STYLE = MvtecLikeStyle()
# MPDD, DTD-Synthetic and other MVTec-AD look-alikes: as MVTec-AD, any image extension for masks.
GENERIC_STYLE = MvtecLikeStyle(mask_extensions=IMAGE_EXTENSIONS)
# BTAD: train/ok, test/ok, test/ko, ground_truth/ko/<stem>.png (products 01, 02) or .bmp (03).
BTAD_STYLE = MvtecLikeStyle(good="ok", mask_suffixes=("",), mask_extensions=(".png", ".bmp"))


def discover_products(src: Path, problems: Problems) -> list[str]:
    """Sorted product folders of ``src`` (every non-hidden sub-folder)."""
    if not problems.require_dir(src, "dataset source root"):
        return []
    products = list_subdirs(src)
    if not products:
        problems.add(f"no product folders in {src}")
    return products


def plan_product(src: Path, product: str, style: MvtecLikeStyle, problems: Problems) -> list[Item]:
    """Items of one product in processing order; records missing folders and masks."""
    product_dir = src / product
    if not problems.require_dir(product_dir, f"product {product!r}"):
        return []  # its contents are not listed one by one
    train_dir = product_dir / "train" / style.good
    test_dir = product_dir / "test"
    items = []
    if problems.require_dir(train_dir, "normal training images"):
        items += [Item(product, TRAIN_GOOD, "", train_dir / n) for n in list_images(train_dir)]
    if not problems.require_dir(test_dir, "test images, one folder per defect type"):
        return items
    for defect in list_subdirs(test_dir):  # sorted (docs/reproduction.md §9)
        images = [test_dir / defect / n for n in list_images(test_dir / defect)]
        if defect == style.good:
            items += [Item(product, TEST_GOOD, "good", image) for image in images]
            continue
        gt_dir = product_dir / "ground_truth" / defect
        if not images or not problems.require_dir(gt_dir, f"masks of test/{defect}"):
            continue
        masks = MaskFolder(gt_dir)
        for image in images:
            mask = masks.find(image, style.mask_suffixes, style.mask_extensions, problems)
            items.append(Item(product, TEST_ANOMALY, defect, image, mask))
    return items


def plan(src: Path, name: str, style: MvtecLikeStyle = GENERIC_STYLE,
         products: Optional[Sequence[str]] = None, mask_threshold: Optional[int] = None) -> Plan:
    """Plan the conversion of an MVTec-AD-layout dataset.

    ``products`` fixes the product order (and makes each one required); by default the products
    are discovered and sorted.  Raises DataError listing every problem.
    """
    src = Path(src)
    problems = Problems()
    if products is None:
        products = discover_products(src, problems)
    elif not problems.require_dir(src, "dataset source root"):
        products = []
    items = []
    for product in products:
        items += plan_product(src, product, style, problems)
    problems.raise_if_any(f"cannot convert {name!r} from {src}")
    threshold = style.default_threshold if mask_threshold is None else mask_threshold
    return Plan(name, tuple(products), items, threshold)
