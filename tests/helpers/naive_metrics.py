"""The straightforward way to compute the docs/reproduction.md §10 metrics: the oracle and the
baseline.

Independent of ``utils.evaluation.metrics``: per-call scikit-learn metrics, the reference AUPRO as a loop
over thresholds that thresholds every map and labels every mask with scikit-image at each
threshold, and the MVTec-style AUPRO from one stable argsort with per-pixel weights. Slow on
purpose; used by the tests as the oracle and by the benchmarks as the baseline.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage import measure
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

__all__ = [
    "naive_product_maps",
    "naive_pixel_metrics",
    "naive_image_metrics",
    "naive_aupro_reference",
    "naive_aupro_official",
    "naive_evaluate_product",
]


def naive_product_maps(raw, new, sigma: float = 8.0, top_k: int = 2000):
    """``(pixel_maps [N, H, W] float32, image_scores [N] float32)`` the plain way."""
    raw = np.asarray(raw, dtype=np.float32)
    new = np.asarray(new, dtype=np.float32)
    maps = np.stack([gaussian_filter(0.2 * r + 0.8 * n, sigma=sigma) for r, n in zip(raw, new)])
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    scores = np.array(
        [
            np.mean(np.sort(r.ravel())[-top_k:]) + np.mean(np.sort(n.ravel())[-top_k:])
            for r, n in zip(raw, new)
        ],
        dtype=np.float32,
    )
    scores = (scores - scores.min()) / (scores.max() - scores.min())
    return maps, scores


def naive_pixel_metrics(maps, masks) -> dict[str, float]:
    """AUROC, AP, F1-max (2PR/(P+R+1e-8)), its threshold and IoU with three scikit-learn calls."""
    y = np.asarray(masks).ravel().astype(int)
    s = np.asarray(maps).ravel()
    precision, recall, thresholds = precision_recall_curve(y, s)
    f1 = (2 * precision * recall) / (precision + recall + 1e-8)
    best = int(np.argmax(f1))
    threshold = thresholds[best]
    pred = s > threshold
    gt = y.astype(bool)
    return {
        "auroc_px": float(roc_auc_score(y, s)),
        "ap_px": float(average_precision_score(y, s)),
        "f1_px": float(np.max(f1[np.isfinite(f1)])),
        "threshold": float(threshold),
        "iou": float(np.logical_and(pred, gt).sum() / np.logical_or(pred, gt).sum()),
    }


def naive_image_metrics(scores, labels) -> dict[str, float]:
    """Image AUROC, AP and F1-max 2PR/(P+R) over finite values, with scikit-learn."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores)
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = (2 * precision * recall) / (precision + recall)
    return {
        "auroc_sp": float(roc_auc_score(y, s)),
        "ap_sp": float(average_precision_score(y, s)),
        "f1_sp": float(np.max(f1[np.isfinite(f1)])),
    }


def naive_aupro_reference(
    maps, masks, max_fpr: float = 0.3, steps: int = 200, connectivity: int | None = None
) -> float:
    """The reference AUPRO, one threshold at a time (docs/reproduction.md §10).

    ``connectivity=None`` is scikit-image's default (full, i.e. 8-connectivity on 2-D masks).
    """
    maps = np.asarray(maps)
    masks = np.asarray(masks).astype(np.int64)
    lo, hi = maps.min(), maps.max()
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / steps):
        positive = maps > th
        fractions = []
        for pos, mask in zip(positive, masks):
            for region in measure.regionprops(measure.label(mask, connectivity=connectivity)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                fractions.append(pos[rows, cols].sum() / region.area)
        normal = 1 - masks
        fprs.append(np.logical_and(normal, positive).sum() / normal.sum())
        pros.append(np.array(fractions).mean())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < max_fpr
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return float(auc(f, pros[keep]))


def naive_aupro_official(maps, masks, max_fpr: float = 0.3) -> float:
    """MVTec-style AUPRO from one stable argsort with per-pixel weights (independent oracle).

    Every anomalous pixel carries a PRO increment 1 / (region area * #regions); sorting all
    pixels by decreasing value and summing (normal pixels counted for the FPR) gives the curve,
    kept at the last pixel of each group of equal values; (0, 0) is prepended; the area up to
    ``max_fpr`` uses ``np.interp`` for the cut, then is divided by ``max_fpr``.
    """
    maps = np.asarray(maps)
    masks = np.asarray(masks).astype(bool)
    region_ids = np.zeros(maps.shape, dtype=np.int64)
    n_regions = 0
    for i, mask in enumerate(masks):
        lab, num = measure.label(mask, return_num=True)
        region_ids[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += num
    areas = np.bincount(region_ids.ravel(), minlength=n_regions + 1)
    ids = region_ids.ravel()
    n_normal = int((~masks).sum())
    d_pro = np.where(ids > 0, 1.0 / (areas[ids] * n_regions), 0.0)
    v = maps.ravel()
    order = np.argsort(-v, kind="stable")
    v_sorted = v[order]
    pro = np.cumsum(d_pro[order])
    last_of_group = np.r_[v_sorted[1:] != v_sorted[:-1], True]
    fp_count = np.cumsum(ids[order] == 0)[last_of_group]
    fpr = np.r_[0.0, fp_count / n_normal]
    pro = np.r_[0.0, pro[last_of_group]]
    inside = fpr <= max_fpr
    x, y = fpr[inside], pro[inside]
    y_cut = np.interp(max_fpr, fpr, pro)
    area = np.trapezoid(y, x) + (max_fpr - x[-1]) * (y[-1] + y_cut) / 2.0
    return float(area / max_fpr)


def naive_evaluate_product(raw, new, masks, labels, scores=None) -> dict[str, float]:
    """The docs/reproduction.md §10 row of one product through the naive functions above;
    ``scores`` [N]: image scores in place of the top-k ones, min-max normalized the same way."""
    maps, top_k = naive_product_maps(raw, new)
    if scores is None:
        scores = top_k
    else:
        scores = np.asarray(scores, dtype=np.float64)
        scores = (scores - scores.min()) / (scores.max() - scores.min())
    row = naive_pixel_metrics(maps, masks)
    row["aupro_px"] = naive_aupro_reference(maps, masks)
    row["aupro_px_official"] = naive_aupro_official(maps, masks)
    row.update(naive_image_metrics(scores, labels))
    return {k: float(v) for k, v in row.items()}
