"""MVTec-AD (docs/reproduction.md §9): the MVTec-AD layout with the fixed product order and the
prefix ``mvtec``.

Original: ``<root>/<product>/{train/good, test/<defect>, ground_truth/<defect>/NNN_mask.png}``.
Output: ``train/good/mvtec_{id}.bmp``, ``test/good/mvtec_good_{id}.bmp``,
``test/anomaly/mvtec_{defect}_{id}.bmp`` + ``ground_truth/anomaly/mvtec_{defect}_{id}.png``
(mask value > 128 -> 255).
"""

from __future__ import annotations

from pathlib import Path

from dataset.common import Plan
from dataset.layouts import mvtec_like
from dataset.products import MVTEC_PRODUCTS

NAME = "mvtec"


def plan(src: Path) -> Plan:
    """Plan the MVTec-AD conversion; every one of the 15 products must be present."""
    return mvtec_like.plan(src, NAME, style=mvtec_like.MVTEC_STYLE, products=MVTEC_PRODUCTS)
