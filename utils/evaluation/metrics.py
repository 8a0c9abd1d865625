"""Test metrics of VCP-CLIP (docs/reproduction.md §10) as pure functions over numpy arrays.

Shapes: N images of H x W pixels per product. ``raw`` / ``new`` are the per-image abnormal maps of
the two branches (float32 ``[N, H, W]``), ``masks`` the ground truth (``[N, H, W]``, {0, 1}),
``labels`` the image labels (``[N]``, {0, 1}).

Three families live here:

* **Map arithmetic** (:func:`product_maps`, built from :func:`smoothed_blend` and
  :func:`image_scores`): blend, Gaussian filter, product-wide min-max
  normalization and the top-k image score, all in float32 like the reference;
  :func:`max_blend_scores`, the image score that MuSc's RsCIN re-scores.
* **ROC / AP / F1 from one sort** (:func:`binary_curve` and the functions taking its result): the
  cumulative true/false-positive counts at every distinct score are computed once, and AUROC,
  average precision, the precision-recall curve, F1-max and its IoU are read off them. They equal
  scikit-learn's ``roc_auc_score``, ``average_precision_score`` and ``precision_recall_curve``
  (ties included) without sorting the product's pixels three times.
* **AUPRO**, two definitions:
  :func:`aupro_reference` is the reference's metric (200 thresholds, FPR < 0.3 rescaled to [0, 1]),
  computed without its per-threshold loop; :func:`aupro_official` *(ours)* is the MVTec-AD
  definition (exact PRO curve, integrated up to FPR 0.3, divided by 0.3).

:func:`evaluate_product` gives one row of the docs/reproduction.md §10 table and
:func:`format_table` prints it.
Every metric is a raw fraction (not x100); undefined metrics are ``nan`` with a warning.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.measure import label as _label_components
from tabulate import tabulate

__all__ = [
    "UndefinedMetricWarning",
    "check_pair",
    "smoothed_blend",
    "image_scores",
    "max_blend_scores",
    "product_maps",
    "BinaryCurve",
    "binary_curve",
    "roc_auc",
    "average_precision",
    "precision_recall_curve",
    "F1Max",
    "f1_max",
    "iou_above",
    "pixel_metrics",
    "image_metrics",
    "reference_pro_thresholds",
    "aupro_reference",
    "pro_curve",
    "aupro_official",
    "evaluate_product",
    "TABLE_COLUMNS",
    "mean_row",
    "format_table",
]

# Reference constants (docs/reproduction.md §10).
BLEND_RAW = 0.2  # weight of the linear ("raw", Pre-VCP) map in the pixel map
BLEND_NEW = 0.8  # weight of the Post-VCP ("new") map
SIGMA = 8.0  # Gaussian filter of the blended map, per image, SciPy defaults otherwise
TOP_K = 2000  # image score: mean of the k largest pixels of each branch
PRO_STEPS = 200  # reference AUPRO: np.arange(min, max, (max - min) / 200)
MAX_FPR = 0.3  # both AUPRO definitions stop at this false-positive rate
F1_EPS = 1e-8  # pixel F1 = 2PR / (P + R + 1e-8) (reference)

_CHUNK = 1 << 22  # elements per chunk when reading long curves (bounds float64 temporaries)


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for a product (no anomalous or no normal pixels / images)."""


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------


def _as_maps(x, name: str, ndim: int = 3) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return a


def _as_binary(x, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(x)
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {a.shape}")
    if a.dtype == bool:
        return a
    if a.size and not ((a == 0) | (a == 1)).all():
        raise ValueError(f"{name}: expected binary values {{0, 1}}, got values {np.unique(a)[:8]}")
    return a.astype(bool)


# ---------------------------------------------------------------------------------------------
# map arithmetic
# ---------------------------------------------------------------------------------------------


def _minmax_float32(x: np.ndarray, what: str) -> np.ndarray:
    """(x - min) / (max - min) over the whole array, in place, float32 like the reference."""
    lo, hi = x.min(), x.max()  # float32 scalars
    if not hi > lo:
        warnings.warn(
            f"{what}: all values are equal ({lo}), min-max normalization is undefined; set to 0",
            UndefinedMetricWarning,
            stacklevel=3,
        )
        x[...] = 0
        return x
    np.subtract(x, lo, out=x)
    np.divide(x, hi - lo, out=x)
    return x


def _top_k_mean(x: np.ndarray, k: int) -> np.float32:
    """Mean of the k largest values of a 2-D float32 map (all of them if it has fewer).

    The top k are sorted ascending before the (pairwise, float32) mean, so the result is exactly
    ``np.mean(np.sort(x.ravel())[-k:])``.
    """
    flat = x.ravel()
    if flat.size > k:
        flat = np.partition(flat, flat.size - k)[flat.size - k :]
    return np.sort(flat).mean(dtype=np.float32)


def check_pair(raw, new, name: str) -> tuple[np.ndarray, np.ndarray]:
    raw = np.asarray(raw, dtype=np.float32)
    new = np.asarray(new, dtype=np.float32)
    if raw.ndim != 3 or raw.shape != new.shape:
        raise ValueError(
            f"{name}: raw and new must both be [N, H, W]; got {raw.shape} and {new.shape}"
        )
    return raw, new


def smoothed_blend(raw, new, *, sigma: float = SIGMA) -> np.ndarray:
    """Per-image pixel maps before the product normalization, float32.

    Args:
        raw: ``[N, H, W]`` abnormal map of the linear branch (cast to float32).
        new: ``[N, H, W]`` abnormal map of the Post-VCP branch (cast to float32).
        sigma: Gaussian sigma (2-D per image, SciPy defaults: reflect, truncate 4).

    Returns:
        ``[N, H, W] float32``: ``gaussian_filter(0.2 * raw + 0.8 * new, sigma)`` per image.
    """
    raw, new = check_pair(raw, new, "smoothed_blend")
    out = np.empty(raw.shape, dtype=np.float32)  # [N, H, W]
    for i in range(raw.shape[0]):
        # 2-D per image; the float32 input keeps SciPy's intermediate pass in float32 too.
        out[i] = gaussian_filter(_blend(raw[i], new[i]), sigma=sigma)
    return out


def _blend(raw: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``0.2 * raw + 0.8 * new`` of one image's float32 maps [H,W] -> [H,W] float32."""
    # Python-float weights times a float32 array stay float32 (NumPy 1.x and 2.x alike).
    return BLEND_RAW * raw + BLEND_NEW * new


def max_blend_scores(raw, new) -> np.ndarray:
    """Per-image maximum of the unsmoothed blend ``0.2 * raw + 0.8 * new``, ``[N] float32``
    (``raw``, ``new``: ``[N, H, W]``, cast to float32): MuSc's image score, the maximum of a map,
    which its RsCIN re-scores (``utils/scoring/mutual.py``)."""
    raw, new = check_pair(raw, new, "max_blend_scores")
    return np.array([_blend(r, n).max() for r, n in zip(raw, new)], dtype=np.float32)


def image_scores(raw, new, *, top_k: int = TOP_K) -> np.ndarray:
    """Per-image scores before the product normalization, float32.

    Args:
        raw, new: ``[N, H, W]`` abnormal maps of the two branches (cast to float32).
        top_k: number of largest pixels averaged per branch (all of them if H*W < top_k).

    Returns:
        ``[N] float32``: ``mean(top_k of raw) + mean(top_k of new)`` per image (unsmoothed maps).
    """
    raw, new = check_pair(raw, new, "image_scores")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    out = np.empty(raw.shape[0], dtype=np.float32)  # [N]
    for i in range(raw.shape[0]):
        out[i] = _top_k_mean(raw[i], top_k) + _top_k_mean(new[i], top_k)
    return out


def product_maps(
    raw,
    new,
    *,
    sigma: float = SIGMA,
    top_k: int = TOP_K,
    name: str = "product",
    scores=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel maps and image scores of one product, float32 throughout (docs/reproduction.md §10).

    Args:
        raw: ``[N, H, W]`` abnormal map of the linear branch per image (cast to float32).
        new: ``[N, H, W]`` abnormal map of the Post-VCP branch per image (cast to float32).
        sigma: Gaussian sigma of the per-image filter (2-D, SciPy defaults: reflect, truncate 4).
        top_k: the image score averages this many largest pixels per branch (all if H*W < k).
        name: product name used in warnings.
        scores: ``[N]`` image scores to use instead of the top-k score (a scoring strategy's,
            e.g. MuSc's RsCIN); None: the top-k score.

    Returns:
        ``pixel_maps [N, H, W] float32``: :func:`smoothed_blend` (``gaussian_filter(0.2*raw +
        0.8*new, sigma)`` per image), then ``(m - min) / (max - min)`` with min / max over the
        whole product. ``image_scores [N] float32``: :func:`image_scores` (``topk_mean(raw) +
        topk_mean(new)``, unsmoothed) or ``scores``, min-max normalized over the product.
        A constant product (max == min) gives zeros and an :class:`UndefinedMetricWarning`.
    """
    raw, new = check_pair(raw, new, name)
    pixel_maps = smoothed_blend(raw, new, sigma=sigma)
    if scores is None:
        scores = image_scores(raw, new, top_k=top_k)
    else:  # a copy: normalized in place below
        scores = np.array(scores, dtype=np.float32).reshape(raw.shape[:1])
    _minmax_float32(pixel_maps, f"{name}: pixel maps")
    _minmax_float32(scores, f"{name}: image scores")
    return pixel_maps, scores


# ---------------------------------------------------------------------------------------------
# ROC / AP / PR / F1 from one sort
# ---------------------------------------------------------------------------------------------


class BinaryCurve(NamedTuple):
    """Cumulative counts at every distinct score, highest score first.

    ``thresholds[t]`` (dtype of the scores) are the distinct scores in decreasing order;
    ``tps[t]`` / ``fps[t]`` (int64) count the positive / negative samples with
    ``score >= thresholds[t]`` -- the same arrays as scikit-learn's internal binary curve.
    All three have shape ``[T]``.
    """

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray
    n_pos: int
    n_neg: int


def binary_curve(scores, labels) -> BinaryCurve:
    """Distinct-threshold cumulative TP / FP counts of ``scores`` against binary ``labels``.

    Args:
        scores: any shape, finite floats (a product's pixel maps ``[N, H, W]`` or image scores).
        labels: same shape, {0, 1} or bool.

    Returns:
        :class:`BinaryCurve` with ``[T]`` arrays, T = number of distinct scores.

    One full sort of the scores (plus one of the positive subset): counts only depend on how many
    samples reach each distinct value, so the order among ties is irrelevant and an unstable
    (SIMD) sort gives exactly scikit-learn's stable-sort counts.
    """
    s = np.asarray(scores)
    y = _as_binary(labels, "labels", s.shape).ravel()
    s = s.ravel()
    if s.size == 0:
        raise ValueError("binary_curve: empty input")
    if not np.isfinite(s).all():
        raise ValueError("binary_curve: scores contain NaN or infinite values")
    n = s.size
    srt = np.sort(s)  # [n] ascending
    first = np.empty(n, dtype=bool)  # first element of each run of equal values
    first[0] = True
    np.not_equal(srt[1:], srt[:-1], out=first[1:])
    starts = np.flatnonzero(first)  # [T] int64, ascending
    del first
    values = srt[starts]  # [T] distinct scores, ascending
    del srt
    pos_sorted = np.sort(s[y])  # [P]
    n_pos = int(pos_sorted.size)
    # samples >= values[t]: everything from the first occurrence on
    n_ge = np.subtract(n, starts, out=starts)  # [T]
    tps = np.searchsorted(pos_sorted, values, side="left")  # positives below values[t]
    np.subtract(n_pos, tps, out=tps)  # positives >= values[t]
    fps = np.subtract(n_ge, tps, out=n_ge)
    # decreasing thresholds, as scikit-learn orders them (contiguous copies for fast searches)
    return BinaryCurve(
        np.ascontiguousarray(values[::-1]),
        np.ascontiguousarray(tps[::-1]),
        np.ascontiguousarray(fps[::-1]),
        n_pos,
        n - n_pos,
    )


def _chunks(size: int, chunk: int = _CHUNK) -> Iterable[slice]:
    for a in range(0, size, chunk):
        yield slice(a, min(a + chunk, size))


def _previous(a: np.ndarray, sl: slice) -> np.ndarray:
    """``a[t - 1]`` for t in the slice, with a[-1] := 0 (the curve starts at the origin)."""
    prev = np.empty(sl.stop - sl.start, dtype=a.dtype)
    prev[0] = a[sl.start - 1] if sl.start > 0 else 0
    prev[1:] = a[sl.start : sl.stop - 1]
    return prev


def roc_auc(curve: BinaryCurve) -> float:
    """Area under the ROC curve (= ``sklearn.metrics.roc_auc_score``); nan if one class is absent.

    Trapezoids between consecutive distinct thresholds, summed exactly in integers:
    ``AUC = sum_t (fps_t - fps_{t-1}) (tps_t + tps_{t-1}) / (2 P N)``.
    """
    p, n = curve.n_pos, curve.n_neg
    if p == 0 or n == 0:
        return math.nan
    total = 0
    for sl in _chunks(curve.tps.size):
        tp, fp = curve.tps[sl], curve.fps[sl]
        total += int(np.dot(fp - _previous(curve.fps, sl), tp + _previous(curve.tps, sl)))
    return total / (2 * p * n)


def average_precision(curve: BinaryCurve) -> float:
    """Average precision (= ``sklearn.metrics.average_precision_score``); nan without positives.

    ``AP = sum_t (R_t - R_{t-1}) P_t`` over decreasing thresholds, with ``P_t = tps/(tps+fps)``,
    ``R_t = tps/P`` (only thresholds where recall grows contribute).
    """
    p = curve.n_pos
    if p == 0:
        return math.nan
    acc = 0.0
    for sl in _chunks(curve.tps.size):
        tp = curve.tps[sl]
        dtp = tp - _previous(curve.tps, sl)
        grow = dtp > 0
        tpg = tp[grow].astype(np.float64)
        acc += float(np.sum(dtp[grow] * (tpg / (tpg + curve.fps[sl][grow]))))
    return acc / p


def precision_recall_curve(curve: BinaryCurve) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision [T+1], recall [T+1], thresholds [T])``, as scikit-learn's
    ``precision_recall_curve`` returns them.

    Increasing thresholds; the last point (precision 1, recall 0) has no threshold. Without
    positives recall is 1 everywhere (scikit-learn's convention). Materializes float64 ``[T]``
    arrays: meant for image scores and tests, pixel metrics use :func:`f1_max`.
    """
    tps = curve.tps[::-1].astype(np.float64)
    ps = tps + curve.fps[::-1]
    precision = np.zeros_like(tps)
    np.divide(tps, ps, out=precision, where=ps != 0)
    recall = tps / curve.n_pos if curve.n_pos > 0 else np.ones_like(tps)
    return (
        np.concatenate([precision, [1.0]]),
        np.concatenate([recall, [0.0]]),
        curve.thresholds[::-1].copy(),
    )


class F1Max(NamedTuple):
    """Best F1 on the PR curve; ``index`` into the :class:`BinaryCurve` (-1 if undefined)."""

    f1: float
    threshold: float
    index: int


def f1_max(curve: BinaryCurve, eps: float = F1_EPS) -> F1Max:
    """Max over the precision-recall curve of ``(2 * P * R) / (P + R + eps)`` and its threshold.

    Reproduces ``f1 = (2*p*r)/(p+r+eps); f1.max(); thresholds[np.argmax(f1)]`` on scikit-learn's
    ``precision_recall_curve`` bit for bit: the same float64 precision / recall values, non-finite
    values ignored (``eps=0`` gives 0/0 where P = R = 0), and among equal maxima the one
    ``np.argmax`` meets first in scikit-learn's increasing-threshold order, i.e. the lowest
    threshold. scikit-learn's extra last point (P = 1, R = 0, no threshold) has F1 = 0 and can
    never be that argmax when positives exist. nan without positives. Chunked: O(chunk) memory.
    """
    p = curve.n_pos
    if p == 0:
        return F1Max(math.nan, math.nan, -1)
    best, best_idx = -math.inf, -1
    for sl in _chunks(curve.tps.size):
        tp = curve.tps[sl].astype(np.float64)
        prec = tp / (tp + curve.fps[sl])  # tp + fp >= 1 at every distinct threshold
        rec = tp / p
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = (2 * prec * rec) / (prec + rec + eps)
        f1[~np.isfinite(f1)] = -math.inf
        m = f1.max()
        if m > -math.inf and m >= best:  # later chunk = lower thresholds wins ties
            best, best_idx = float(m), sl.start + int(np.flatnonzero(f1 == m)[-1])
    if best_idx < 0:  # no finite value (impossible with positives): the (1, 0) end point
        return F1Max(0.0, math.nan, -1)
    return F1Max(best, float(curve.thresholds[best_idx]), best_idx)


def iou_above(curve: BinaryCurve, index: int) -> float:
    """IoU of ``{score > thresholds[index]}`` with the positives, over all samples.

    Samples strictly above ``thresholds[index]`` are those counted at ``index - 1``:
    ``IoU = tps[index-1] / (P + fps[index-1])`` (intersection / union). nan if undefined.
    """
    if index < 0:
        return math.nan
    tp = int(curve.tps[index - 1]) if index > 0 else 0
    fp = int(curve.fps[index - 1]) if index > 0 else 0
    union = curve.n_pos + fp
    return tp / union if union > 0 else math.nan


def pixel_metrics(maps, masks, curve: BinaryCurve | None = None) -> dict[str, float]:
    """Pixel-level AUROC, AP, F1-max (eps 1e-8), its threshold and IoU over a product.

    Args:
        maps: ``[N, H, W]`` normalized pixel maps. masks: ``[N, H, W]`` {0, 1}.
        curve: :func:`binary_curve` of (maps, masks) if already computed.

    Returns:
        ``{"auroc_px", "ap_px", "f1_px", "threshold", "iou"}`` (floats, nan where undefined).
    """
    if curve is None:
        curve = binary_curve(maps, masks)
    best = f1_max(curve, F1_EPS)
    return {
        "auroc_px": roc_auc(curve),
        "ap_px": average_precision(curve),
        "f1_px": best.f1,
        "threshold": best.threshold,
        "iou": iou_above(curve, best.index),
    }


def image_metrics(scores, labels) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max ``2PR/(P+R)`` over finite values.

    Args:
        scores: ``[N]`` image scores. labels: ``[N]`` {0, 1}.

    Returns:
        ``{"auroc_sp", "ap_sp", "f1_sp"}`` (floats, nan where undefined).
    """
    curve = binary_curve(scores, labels)
    return {
        "auroc_sp": roc_auc(curve),
        "ap_sp": average_precision(curve),
        "f1_sp": f1_max(curve, eps=0.0).f1,
    }


# ---------------------------------------------------------------------------------------------
# AUPRO
# ---------------------------------------------------------------------------------------------


def _label_image(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected ground-truth regions of one 2-D mask, 8-connectivity (skimage's 2-D default)."""
    lab, num = _label_components(mask, connectivity=2, return_num=True)
    return lab, int(num)


def _trapezoid_auc(x: np.ndarray, y: np.ndarray) -> float:
    """``sklearn.metrics.auc`` semantics: x monotonic (either direction), area >= 0 if y >= 0."""
    dx = np.diff(x)
    direction = 1.0
    if np.any(dx < 0):
        if not np.all(dx <= 0):
            raise ValueError("x is neither increasing nor decreasing")
        direction = -1.0
    return direction * float((dx * (y[1:] + y[:-1]) / 2.0).sum())


def reference_pro_thresholds(maps, steps: int = PRO_STEPS) -> np.ndarray:
    """The reference's AUPRO thresholds: ``np.arange(min, max, (max - min) / steps)``.

    ``min`` / ``max`` are scalars of the maps' dtype (float32) and so is the step; NumPy's arange
    of float32 scalars returns float64 values ``min + i * step`` (200 or 201 of them, whatever
    the expression yields). Empty if the maps are constant.
    """
    maps = np.asarray(maps)
    lo, hi = maps.min(), maps.max()
    return _arange_thresholds(lo, (hi - lo) / steps, hi)


def _arange_thresholds(lo, step, hi) -> np.ndarray:
    """``np.arange(lo, hi, step)`` of the maps' scalars; empty unless ``step > 0``."""
    if not step > 0:
        return np.empty(0, dtype=np.result_type(lo, step))
    return np.arange(lo, hi, step)


def _positive_cuts(thresholds: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Per threshold, the smallest c of ``sample.dtype`` with ``value > th <=> value >= c``.

    ``value > th`` is evaluated with NumPy's own promotion of ``maps > np.float64(th)`` (float64
    under NumPy 2, float32 under NumPy 1's value-based casting), so the cuts reproduce the
    reference's comparisons exactly while the search itself runs on the maps' own dtype.
    """
    cmp_dtype = np.result_type(sample, thresholds[0])
    th = thresholds.astype(cmp_dtype)
    r = th.astype(sample.dtype)  # nearest representable value
    cuts = np.where(r.astype(cmp_dtype) > th, r, np.nextafter(r, np.inf, dtype=sample.dtype))
    return cuts.astype(sample.dtype)


def _threshold_bins(values: np.ndarray, cuts: np.ndarray, lo, step) -> np.ndarray:
    """Per value, the number of cuts <= value (``searchsorted(cuts, values, "right")``) in O(n).

    The thresholds are ``lo + i * step``, so ``ceil((value - lo) / step)`` (clipped to [0, T])
    is the count up to rounding; every estimate is then checked against the exact cuts on both
    sides (``cuts[k-1] <= value < cuts[k]``) and the few that miss -- values within rounding of a
    threshold -- are searched exactly.

    Args:
        values: ``[n]`` map values (>= lo). cuts: ``[T]`` from :func:`_positive_cuts`.
        lo, step: first threshold and step, scalars of the maps' dtype.

    Returns:
        ``[n]`` intp in 0..T.
    """
    n_th = cuts.size
    k = np.subtract(values, lo)  # [n] in the maps' dtype, >= 0
    np.divide(k, step, out=k)
    np.ceil(k, out=k)
    np.fmin(k, n_th, out=k)  # (also maps a NaN from an infinite range to T)
    k = k.astype(np.intp)
    below = np.concatenate([[-np.inf], cuts]).astype(cuts.dtype)  # below[k] = cuts[k-1]
    above = np.concatenate([cuts, [np.inf]]).astype(cuts.dtype)  # above[k] = cuts[k]
    miss = np.less(values, below.take(k))
    miss |= np.greater_equal(values, above.take(k))
    wrong = np.flatnonzero(miss)
    if wrong.size:
        k[wrong] = np.searchsorted(cuts, values[wrong], side="right")
    return k


def aupro_reference(
    maps, masks, *, max_fpr: float = MAX_FPR, steps: int = PRO_STEPS
) -> float:
    """AUPRO as the reference computes it (docs/reproduction.md §10), in one pass over the pixels.

    Definition: thresholds ``th = np.arange(min, max, (max - min) / steps)`` over the product's
    maps; at each, pixel positive iff ``value > th``; PRO(th) = mean over every connected
    ground-truth region (8-connectivity, every image) of the fraction of its pixels that are
    positive; FPR(th) = positive normal pixels / normal pixels. Keep the thresholds with
    FPR < ``max_fpr``, min-max rescale those FPRs to [0, 1] and return the trapezoid area under
    PRO (``sklearn.metrics.auc`` on decreasing x).

    Algorithm: regions are labelled once per image. Each threshold becomes a "cut" c (smallest
    map value that is > th), and each pixel gets its bin k = number of cuts <= value = number of
    thresholds at which it is positive, by arithmetic on the evenly spaced thresholds corrected
    exactly at the bin edges (:func:`_threshold_bins`; no sort). A histogram of k over all pixels
    gives the positives at every threshold, one over (region, k) the region counts; reverse
    cumulative sums turn them into counts at every threshold. Memory: O(H*W) per image plus
    ``[regions, thresholds]`` counts.

    Args:
        maps: ``[N, H, W]`` float pixel maps. masks: ``[N, H, W]`` {0, 1}.

    Returns:
        The area (float); nan if there is no region, no normal pixel, fewer than two kept
        thresholds or the kept FPRs are all equal (the reference would crash or give nan).
    """
    maps = _as_maps(maps, "maps")
    masks = _as_binary(masks, "masks", maps.shape)
    lo, hi = maps.min(), maps.max()
    step = (hi - lo) / steps  # the reference's step, a scalar of the maps' dtype
    ths = _arange_thresholds(lo, step, hi)  # = reference_pro_thresholds(maps, steps)
    n_th = ths.size
    if n_th == 0:
        return math.nan
    cuts = _positive_cuts(ths, maps[:1])  # [T] in the maps' dtype, non-decreasing
    bins_all = np.zeros(n_th + 1, dtype=np.int64)  # pixels per bin k, all images
    region_bins: list[np.ndarray] = []  # [R_i, T + 1] per image with regions
    for image, mask in zip(maps, masks):
        k = _threshold_bins(image.ravel(), cuts, lo, step).reshape(image.shape)  # [H, W] 0..T
        bins_all += np.bincount(k.ravel(), minlength=n_th + 1)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # the regions' bounding box
        lab, num = _label_image(mask[box])
        inside = lab > 0
        region_bins.append(np.bincount(
            (lab[inside].astype(np.intp) - 1) * (n_th + 1) + k[box][inside],
            minlength=num * (n_th + 1),
        ).reshape(num, n_th + 1))
    if not region_bins:
        return math.nan
    # positives at threshold t: pixels with k > t; cum[..., t] = #(k >= t)
    cum = np.cumsum(np.concatenate(region_bins)[:, ::-1], axis=1)[:, ::-1]  # [R, T + 1]
    reg, area = cum[:, 1:], cum[:, 0]  # [R, T], [R]
    ge_all = np.cumsum(bins_all[::-1])[::-1][1:]  # [T]
    n_normal = masks.size - int(area.sum())
    if n_normal == 0:
        return math.nan
    pro = (reg / area[:, None]).mean(axis=0)  # [T]
    fpr = (ge_all - reg.sum(axis=0)) / n_normal  # [T], non-increasing
    keep = fpr < max_fpr
    if keep.sum() < 2:
        return math.nan
    f = fpr[keep]
    lo, hi = f.min(), f.max()
    if not hi > lo:
        return math.nan
    return _trapezoid_auc((f - lo) / (hi - lo), pro[keep])


def pro_curve(
    maps, masks, *, curve: BinaryCurve | None = None, max_fpr: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve over every distinct threshold *(ours, MVTec-AD definition)*.

    At threshold t (every distinct map value, decreasing) a pixel is positive iff value >= t.
    FPR(t) = positive normal pixels / normal pixels; PRO(t) = mean over the connected
    ground-truth regions (8-connectivity, every image) of their positive fraction. The curve
    starts at (0, 0) (t = +inf) and ends at (1, 1).

    Args:
        maps: ``[N, H, W]`` float. masks: ``[N, H, W]`` {0, 1}.
        curve: :func:`binary_curve` of (maps, masks) if already computed (its ``fps`` give FPR).
        max_fpr: if set, the curve stops at the first point with FPR > max_fpr.

    Returns:
        ``(fpr [M], pro [M])`` float64, both non-decreasing; empty arrays if there is no region
        or no normal pixel.
    """
    maps = _as_maps(maps, "maps")
    masks = _as_binary(masks, "masks", maps.shape)
    if curve is None:
        curve = binary_curve(maps, masks)
    if curve.n_pos == 0 or curve.n_neg == 0:
        return np.empty(0), np.empty(0)
    # region of every anomalous pixel, in the C order of maps[masks]
    region_of: list[np.ndarray] = []
    offset = 0
    for i in range(maps.shape[0]):
        if masks[i].any():
            lab, num = _label_image(masks[i])
            region_of.append(lab[masks[i]].astype(np.int64) - 1 + offset)
            offset += num
    region = np.concatenate(region_of)  # [A]
    area = np.bincount(region, minlength=offset)  # [R]
    weight = 1.0 / (area[region] * offset)  # each region weighs 1/R, spread over its pixels
    values = maps[masks]  # [A]
    order = np.argsort(values, kind="stable")[::-1]  # decreasing values
    pro_top = np.cumsum(weight[order])  # [A]: PRO of the j+1 highest anomalous pixels
    n_pts = curve.tps.size
    if max_fpr is not None:
        # first index whose FPR surely exceeds max_fpr, then refine in float below
        bound = int(math.floor(max_fpr * curve.n_neg)) + 2
        n_pts = min(n_pts, int(np.searchsorted(curve.fps, bound, side="left")) + 1)
    tps = curve.tps[:n_pts]
    fpr = np.concatenate([[0.0], curve.fps[:n_pts] / curve.n_neg])
    pro = np.concatenate([[0.0], np.where(tps > 0, pro_top[np.maximum(tps - 1, 0)], 0.0)])
    if max_fpr is not None:
        over = np.flatnonzero(fpr > max_fpr)
        if over.size:
            fpr, pro = fpr[: over[0] + 1], pro[: over[0] + 1]
    return fpr, pro


def aupro_official(
    maps, masks, *, max_fpr: float = MAX_FPR, curve: BinaryCurve | None = None
) -> float:
    """Normalized area under the exact PRO curve up to FPR = ``max_fpr`` *(ours, MVTec-AD)*.

    Definition: take the :func:`pro_curve` (every distinct threshold, positive iff value >= t,
    starting at (0, 0)) as a piecewise-linear function PRO(FPR); integrate it with the trapezoid
    rule from FPR = 0 to exactly FPR = ``max_fpr``, the last segment cut at ``max_fpr`` with
    PRO linearly interpolated between the last point with FPR <= max_fpr and the first with
    FPR > max_fpr; divide by ``max_fpr`` so a perfect map scores 1. Vertical steps (PRO rising at
    a constant FPR) add no area. nan if there is no region or no normal pixel.

    Args:
        maps: ``[N, H, W]`` float. masks: ``[N, H, W]`` {0, 1}.
        curve: :func:`binary_curve` of (maps, masks) if already computed.
    """
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro = pro_curve(maps, masks, curve=curve, max_fpr=max_fpr)
    if fpr.size == 0:
        return math.nan
    over = np.flatnonzero(fpr > max_fpr)
    if over.size == 0:  # max_fpr == 1: the whole curve
        return _trapezoid_auc(fpr, pro) / max_fpr
    j = int(over[0])  # first point beyond the limit; j >= 1 since fpr[0] = 0
    x0, y0, x1, y1 = fpr[j - 1], pro[j - 1], fpr[j], pro[j]
    y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
    area = _trapezoid_auc(fpr[:j], pro[:j]) if j >= 2 else 0.0
    area += (max_fpr - x0) * (y0 + y_cut) / 2.0
    return area / max_fpr


# ---------------------------------------------------------------------------------------------
# one product, the table
# ---------------------------------------------------------------------------------------------

PIXEL_KEYS = ("auroc_px", "aupro_px", "aupro_px_official", "ap_px", "f1_px", "iou", "threshold")
IMAGE_KEYS = ("auroc_sp", "ap_sp", "f1_sp")


def evaluate_product(
    raw,
    new,
    masks,
    labels,
    name: str,
    *,
    sigma: float = SIGMA,
    top_k: int = TOP_K,
    scores=None,
) -> tuple[dict[str, float], np.ndarray]:
    """One row of the docs/reproduction.md §10 table for a product, plus its normalized pixel maps.

    Args:
        raw, new: ``[N, H, W]`` float32 abnormal maps of the two branches.
        masks: ``[N, H, W]`` {0, 1} ground truth. labels: ``[N]`` {0, 1} image labels.
        name: product name, used in warnings.
        scores: ``[N]`` image scores instead of the top-k score (:func:`product_maps`).

    Returns:
        ``(row, pixel_maps)``: ``row`` has auroc_px, aupro_px (reference), aupro_px_official,
        ap_px, f1_px, iou, threshold, auroc_sp, ap_sp, f1_sp as raw fractions (not x100);
        ``pixel_maps [N, H, W] float32`` are the maps the pixel metrics were computed on (for the
        panels). A metric undefined for the product (no anomalous or no normal pixels / images)
        is nan, with one :class:`UndefinedMetricWarning` naming the product.
    """
    pixel_maps, scores = product_maps(raw, new, sigma=sigma, top_k=top_k, name=name,
                                      scores=scores)
    masks = _as_binary(masks, f"{name}: masks", pixel_maps.shape)
    labels = _as_binary(labels, f"{name}: labels", scores.shape)
    curve = binary_curve(pixel_maps, masks)
    row: dict[str, float] = dict(pixel_metrics(pixel_maps, masks, curve))
    row["aupro_px"] = aupro_reference(pixel_maps, masks)
    row["aupro_px_official"] = aupro_official(pixel_maps, masks, curve=curve)
    del curve
    row.update(image_metrics(scores, labels))
    row = {k: float(row[k]) for k in PIXEL_KEYS + IMAGE_KEYS}

    reasons = []
    if not masks.any():
        reasons.append("no anomalous pixels")
    if masks.all():
        reasons.append("no normal pixels")
    if not labels.any():
        reasons.append("no anomalous images")
    if labels.all():
        reasons.append("no normal images")
    undefined = [k for k, v in row.items() if math.isnan(v)]
    if reasons or undefined:
        warnings.warn(
            f"{name}: {', '.join(reasons) or 'degenerate maps'}; "
            f"undefined metrics set to nan: {', '.join(undefined) or 'none'}",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    return row, pixel_maps


TABLE_COLUMNS: tuple[str, ...] = (
    "auroc_px",
    "aupro_px",
    "ap_px",
    "f1_px",
    "iou",
    "auroc_sp",
    "ap_sp",
    "f1_sp",
    "threshold",
)


def mean_row(
    rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = TABLE_COLUMNS
) -> dict[str, float]:
    """``nanmean`` over products of every column (nan where a column is nan for all)."""
    out = {}
    for c in columns:
        vals = np.array([float(r.get(c, math.nan)) for r in rows.values()], dtype=np.float64)
        finite = vals[~np.isnan(vals)]
        out[c] = float(finite.mean()) if finite.size else math.nan
    return out


def format_table(
    rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = TABLE_COLUMNS
) -> str:
    """The docs/reproduction.md §10 pipe table: one row per product then ``mean`` (nanmean over
    products).

    Args:
        rows: product name -> row of raw fractions (as :func:`evaluate_product` returns).
        columns: metric columns after ``objects``; metrics are printed x100 with 2 decimals,
            ``threshold`` as is with 3 decimals, nan as ``nan``.
    """

    def cell(col: str, value) -> str:
        v = float(value)
        if math.isnan(v):
            return "nan"
        return f"{v:.3f}" if col == "threshold" else f"{100.0 * v:.2f}"

    body = [[str(n)] + [cell(c, r.get(c, math.nan)) for c in columns] for n, r in rows.items()]
    means = mean_row(rows, columns)
    body.append(["mean"] + [cell(c, means[c]) for c in columns])
    # the cells are formatted above, so tabulate must not re-read them as numbers ("80.00" -> 80)
    return tabulate(body, headers=["objects", *columns], tablefmt="pipe", disable_numparse=True,
                    colalign=("left", *("right",) * len(columns)))
