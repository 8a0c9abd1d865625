"""utils.evaluation.metrics against independent oracles: scikit-learn, the naive loops, hand-worked values."""

import math
import warnings

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from helpers.naive_metrics import (
    naive_aupro_official,
    naive_aupro_reference,
    naive_evaluate_product,
    naive_image_metrics,
    naive_pixel_metrics,
)
from utils.evaluation import metrics as M

TOL = 1e-9


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _scores(rng, n, kind):
    if kind == "continuous":
        return rng.random(n).astype(np.float32)
    if kind == "quantized":  # few distinct values: many ties across classes
        return (rng.integers(0, 7, n) / 6).astype(np.float32)
    if kind == "binary":
        return rng.integers(0, 2, n).astype(np.float32)
    if kind == "float64":
        return np.round(rng.normal(size=n), 2)
    raise ValueError(kind)


def _random_product(rng, n=5, h=40, w=40, quantize=None):
    """Smooth float32 maps in [0, 1] with several rectangular regions per anomalous image,
    two of them touching only at a corner (one region under 8-connectivity)."""
    maps = np.stack(
        [gaussian_filter(rng.random((h, w)).astype(np.float32), 2.0) for _ in range(n)]
    )
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        if i % 3 == 2:  # some normal images
            continue
        y, x = rng.integers(2, h - 12, 2)
        masks[i, y : y + 3, x : x + 3] = 1  # diagonal pair
        masks[i, y + 3 : y + 6, x + 3 : x + 6] = 1
        for _ in range(rng.integers(1, 4)):
            y0, x0 = rng.integers(0, h - 6, 2)
            hh, ww = rng.integers(1, 6, 2)
            masks[i, y0 : y0 + hh, x0 : x0 + ww] = 1
    maps = maps + 0.04 * masks * rng.random(maps.shape).astype(np.float32)
    maps = ((maps - maps.min()) / (maps.max() - maps.min())).astype(np.float32)
    if quantize:
        maps = (np.round(maps * quantize) / quantize).astype(np.float32)
    return maps, masks


# ---------------------------------------------------------------------------------------------
# ROC / AP / PR / F1 from one sort vs scikit-learn
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["continuous", "quantized", "binary", "float64"])
@pytest.mark.parametrize("n", [2, 7, 500])
def test_curve_metrics_match_sklearn(kind, n):
    rng = np.random.default_rng(n + len(kind))
    for _ in range(5):
        s = _scores(rng, n, kind)
        y = (rng.random(n) < 0.3).astype(int)
        y[0], y[-1] = 1, 0  # both classes present
        curve = M.binary_curve(s, y)
        assert abs(M.roc_auc(curve) - roc_auc_score(y, s)) < TOL
        assert abs(M.average_precision(curve) - average_precision_score(y, s)) < TOL
        p, r, t = M.precision_recall_curve(curve)
        p_ref, r_ref, t_ref = precision_recall_curve(y, s)
        np.testing.assert_array_equal(p, p_ref)
        np.testing.assert_array_equal(r, r_ref)
        np.testing.assert_array_equal(t, t_ref)
        assert t.dtype == t_ref.dtype


@pytest.mark.parametrize("quantize", [None, 20])
def test_pixel_metrics_match_naive(quantize):
    maps, masks = _random_product(np.random.default_rng(1), quantize=quantize)
    ours, ref = M.pixel_metrics(maps, masks), naive_pixel_metrics(maps, masks)
    for k in ref:
        assert abs(ours[k] - ref[k]) < TOL, k
    assert ours["threshold"] == ref["threshold"]  # the very same float32 value


@pytest.mark.parametrize("kind", ["continuous", "quantized", "binary"])
def test_image_metrics_match_naive(kind):
    rng = np.random.default_rng(2)
    for n in (3, 40):
        s = _scores(rng, n, kind)
        y = (rng.random(n) < 0.5).astype(int)
        y[0], y[1] = 0, 1
        ours, ref = M.image_metrics(s, y), naive_image_metrics(s, y)
        for k in ref:
            assert abs(ours[k] - ref[k]) < TOL, k


def test_f1_tie_takes_lowest_threshold_like_argmax():
    # thresholds 4 (P=1, R=.5) and 1 (P=.5, R=1) have bitwise-equal F1 = 2/3;
    # np.argmax over scikit-learn's increasing thresholds picks the lower one.
    s = np.array([4, 3, 2, 1], dtype=np.float32)
    y = np.array([1, 0, 0, 1])
    best = M.f1_max(M.binary_curve(s, y))
    assert best.threshold == 1.0
    assert best.f1 == pytest.approx(2 / 3)
    ref = naive_pixel_metrics(s[None, None], y[None, None])
    assert ref["threshold"] == best.threshold
    # IoU of {s > 1} = {4, 3, 2} with {4, 1}: 1 / 4
    assert M.iou_above(M.binary_curve(s, y), best.index) == 0.25 == ref["iou"]


def test_curve_undefined_cases_are_nan():
    s = np.array([0.1, 0.5, 0.5], dtype=np.float32)
    no_pos = M.binary_curve(s, np.zeros(3, int))
    assert math.isnan(M.roc_auc(no_pos)) and math.isnan(M.average_precision(no_pos))
    assert math.isnan(M.f1_max(no_pos).f1)
    all_pos = M.binary_curve(s, np.ones(3, int))
    assert math.isnan(M.roc_auc(all_pos))
    assert M.average_precision(all_pos) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        M.binary_curve(np.array([0.1, np.nan]), np.array([0, 1]))


# ---------------------------------------------------------------------------------------------
# reference AUPRO: fast vs the naive per-threshold loop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,quantize", [(3, None), (4, None), (5, 200), (6, 37)])
def test_aupro_reference_matches_naive_loop(seed, quantize):
    maps, masks = _random_product(np.random.default_rng(seed), quantize=quantize)
    assert abs(M.aupro_reference(maps, masks) - naive_aupro_reference(maps, masks)) < TOL


def test_aupro_reference_values_on_threshold_boundaries():
    """Map values at, just below and just above the float32 roundings of the thresholds:
    the comparison value > threshold must follow NumPy's promotion exactly."""
    rng = np.random.default_rng(7)
    ths = np.arange(np.float32(0), np.float32(1), np.float32(1) / 200)
    base = ths.astype(np.float32)
    pool = np.concatenate(
        [base, np.nextafter(base, np.float32(2)), np.nextafter(base, np.float32(-1))]
    )
    pool = pool[(pool >= 0) & (pool <= 1)]
    maps = rng.choice(pool, size=(4, 24, 24)).astype(np.float32)
    maps[0, 0, 0], maps[0, 0, 1] = 0.0, 1.0  # fixes min and max, hence the thresholds
    masks = np.zeros(maps.shape, dtype=np.uint8)
    masks[0, 3:9, 3:7] = 1
    masks[1, 10:20, 2:5] = 1
    masks[3, 1:4, 1:4] = 1
    np.testing.assert_array_equal(M.reference_pro_thresholds(maps), ths)
    assert abs(M.aupro_reference(maps, masks) - naive_aupro_reference(maps, masks)) < TOL


def test_aupro_reference_uses_8_connectivity():
    # a 2x2 and a 3x3 square touching at one corner: one region with 8-connectivity, two with 4
    masks = np.zeros((2, 12, 12), dtype=np.uint8)
    masks[0, 2:4, 2:4] = 1
    masks[0, 4:7, 4:7] = 1
    maps = np.random.default_rng(8).random(masks.shape).astype(np.float32) * np.float32(0.5)
    maps[0, 2:4, 2:4] = 1.0  # the small square is found at once, the large one like the noise
    ours = M.aupro_reference(maps, masks)
    assert abs(ours - naive_aupro_reference(maps, masks)) < TOL
    assert abs(ours - naive_aupro_reference(maps, masks, connectivity=1)) > 1e-3


def test_aupro_reference_thresholds_are_the_reference_expression():
    maps, _ = _random_product(np.random.default_rng(9), n=2)
    maps = maps * np.float32(0.73) + np.float32(0.11)
    lo, hi = maps.min(), maps.max()
    np.testing.assert_array_equal(
        M.reference_pro_thresholds(maps), np.arange(lo, hi, (hi - lo) / 200)
    )
    assert M.reference_pro_thresholds(maps).size in (200, 201)


@pytest.mark.parametrize("dtype,lo,span", [
    (np.float32, 0.0, 1.0),
    (np.float32, 1000.0, 3e-3),  # a few float32 steps per threshold: rounding everywhere
    (np.float32, -7.5, 2e-4),  # fewer representable values than thresholds: repeated cuts
    (np.float64, 0.25, 1e-9),
])
def test_threshold_bins_equal_a_search_of_every_value_by_the_threshold_comparisons(dtype, lo,
                                                                                  span):
    """The arithmetic bins equal, for every value, the count of thresholds th with value > th
    (the reference's comparison, as NumPy evaluates it), also exactly at and next to them."""
    rng = np.random.default_rng(11)
    lo, hi = dtype(lo), dtype(lo + span)
    near = np.arange(lo, hi, (hi - lo) / 200).astype(dtype)
    values = np.concatenate([
        rng.uniform(lo, hi, 4000).astype(dtype), near,
        np.nextafter(near, dtype(np.inf)), np.nextafter(near, dtype(-np.inf)), [lo, hi]])
    values = np.clip(values, lo, hi)
    maps = values[None, None, :]
    ths = M.reference_pro_thresholds(maps)
    cuts = M._positive_cuts(ths, maps)
    k = M._threshold_bins(values, cuts, maps.min(), (maps.max() - maps.min()) / 200)
    expected = (values[:, None] > ths[None, :]).sum(axis=1)  # [n] the reference's comparisons
    np.testing.assert_array_equal(k, expected)


def test_aupro_reference_on_a_narrow_range_far_from_zero():
    maps, masks = _random_product(np.random.default_rng(12), n=3)
    # ~140 float32 values: the thresholds step by one float32 spacing, some lie above the max
    maps = np.float32(1000) + maps * np.float32(0.01)
    assert abs(M.aupro_reference(maps, masks) - naive_aupro_reference(maps, masks)) < TOL


def test_aupro_undefined_is_nan():
    maps, masks = _random_product(np.random.default_rng(10), n=2)
    assert math.isnan(M.aupro_reference(maps, np.zeros_like(masks)))
    assert math.isnan(M.aupro_official(maps, np.zeros_like(masks)))
    assert math.isnan(M.aupro_reference(maps, np.ones_like(masks)))
    assert math.isnan(M.aupro_official(maps, np.ones_like(masks)))


# ---------------------------------------------------------------------------------------------
# official AUPRO (ours)
# ---------------------------------------------------------------------------------------------


def _hand_example():
    # Two images 1x7. Region r1 (image A, 2 px): 0.9, 0.4. Region r2 (image B, 2 px): 0.6, 0.05.
    # Normal pixels (10): A 0.8 0.4 0.1 0.1 0.1, B 0.3 0.2 0.1 0.0 0.0.
    maps = np.array(
        [[[0.9, 0.4, 0.8, 0.4, 0.1, 0.1, 0.1]], [[0.3, 0.2, 0.1, 0.0, 0.0, 0.6, 0.05]]],
        dtype=np.float32,
    )
    masks = np.array([[[1, 1, 0, 0, 0, 0, 0]], [[0, 0, 0, 0, 0, 1, 1]]], dtype=np.uint8)
    return maps, masks


def test_aupro_official_hand_worked():
    maps, masks = _hand_example()
    # Distinct thresholds, decreasing; positive iff value >= t; PRO = (f1 + f2) / 2:
    #   t=0.9: r1 1/2, r2 0   -> PRO 0.25, FP 0 -> FPR 0.0
    #   t=0.8:                -> PRO 0.25, FP 1 -> FPR 0.1
    #   t=0.6: r2 1/2         -> PRO 0.50, FPR 0.1
    #   t=0.4: r1 1 (+ normal 0.4) -> PRO 0.75, FPR 0.2   (diagonal segment, a tie)
    #   t=0.3:                -> PRO 0.75, FPR 0.3
    #   t=0.2:                -> PRO 0.75, FPR 0.4  ...
    # Curve from (0,0): (0,.25) (.1,.25) (.1,.5) (.2,.75) (.3,.75) (.4,.75) ...
    # Area to 0.3: 0 + .1*.25 + 0 + .1*(.5+.75)/2 + .1*.75 = .025 + .0625 + .075 = .1625
    # AUPRO = .1625 / .3 = 13/24.
    fpr, pro = M.pro_curve(maps, masks)
    np.testing.assert_allclose(fpr[:7], [0, 0, 0.1, 0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(pro[:7], [0, 0.25, 0.25, 0.5, 0.75, 0.75, 0.75])
    assert fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0)
    assert abs(M.aupro_official(maps, masks) - 13 / 24) < TOL
    # Limit 0.15 cuts the diagonal segment (.1,.5)-(.2,.75) at PRO .625:
    # area = .025 + .05*(.5+.625)/2 = .053125; / .15 = 17/48.
    assert abs(M.aupro_official(maps, masks, max_fpr=0.15) - 17 / 48) < TOL
    assert abs(naive_aupro_official(maps, masks) - 13 / 24) < TOL


@pytest.mark.parametrize("seed,quantize", [(11, None), (12, 50)])
def test_aupro_official_matches_naive(seed, quantize):
    maps, masks = _random_product(np.random.default_rng(seed), quantize=quantize)
    assert abs(M.aupro_official(maps, masks) - naive_aupro_official(maps, masks)) < TOL
    assert 0.0 <= M.aupro_official(maps, masks) <= 1.0


def test_aupro_official_perfect_map_is_one():
    _, masks = _random_product(np.random.default_rng(13), n=3)
    maps = masks.astype(np.float32)
    assert M.aupro_official(maps, masks) == pytest.approx(1.0, abs=TOL)


# ---------------------------------------------------------------------------------------------
# product maps, evaluate_product, table
# ---------------------------------------------------------------------------------------------


def test_product_maps_worked_example():
    rng = np.random.default_rng(14)
    raw = rng.random((3, 20, 30)).astype(np.float32)
    new = rng.random((3, 20, 30)).astype(np.float32)
    pixel_maps, scores = M.product_maps(raw, new, top_k=5)
    assert pixel_maps.dtype == np.float32 and scores.dtype == np.float32
    assert pixel_maps.shape == (3, 20, 30) and scores.shape == (3,)
    # float32 all the way: blend, per-image 2-D filter, product-wide min-max
    blend = np.float32(0.2) * raw + np.float32(0.8) * new
    smooth = np.stack([gaussian_filter(b, sigma=8) for b in blend])
    assert smooth.dtype == np.float32
    expected = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    np.testing.assert_array_equal(pixel_maps, expected)
    assert pixel_maps.min() == 0 and pixel_maps.max() == 1
    # image score: mean of the 5 largest of raw + of new, unsmoothed, then min-max
    top = np.array(
        [np.sort(r.ravel())[-5:].mean() + np.sort(n.ravel())[-5:].mean() for r, n in zip(raw, new)],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(scores, (top - top.min()) / (top.max() - top.min()))
    # the un-normalized pieces (per-image use in predict.py)
    np.testing.assert_array_equal(M.smoothed_blend(raw, new), smooth)
    np.testing.assert_array_equal(M.image_scores(raw, new, top_k=5), top)
    assert M.image_scores(raw, new).dtype == np.float32


def test_product_maps_top_k_by_hand_and_small_maps():
    raw = np.zeros((3, 4, 4), dtype=np.float32)
    new = np.zeros((3, 4, 4), dtype=np.float32)
    raw[0, 0, :3] = [1.0, 0.5, 0.25]  # top-2 mean 0.75
    new[1, 1, 1] = 3.0  # top-2 mean 1.5
    raw[2, 2, :2] = [0.25, 0.25]  # top-2 mean 0.25
    _, scores = M.product_maps(raw, new, top_k=2)
    # raw scores 0.75, 1.5, 0.25 -> (s - 0.25) / 1.25
    np.testing.assert_array_equal(scores, np.array([0.4, 1.0, 0.0], dtype=np.float32))
    # H*W = 16 < 2000: the mean of all pixels, sums 1.75, 3.0, 0.5 -> (s - 0.5) / 2.5
    _, scores_all = M.product_maps(raw, new)
    np.testing.assert_allclose(scores_all, [0.5, 1.0, 0.0], rtol=1e-6)


def test_evaluate_product_matches_naive():
    rng = np.random.default_rng(15)
    raw = rng.random((6, 48, 48)).astype(np.float32) * 0.3
    new = rng.random((6, 48, 48)).astype(np.float32) * 0.3
    masks = np.zeros((6, 48, 48), dtype=np.uint8)
    masks[0, 5:15, 5:20] = 1
    masks[1, 30:40, 30:34] = 1
    masks[1, 40:44, 34:40] = 1
    masks[3, 0:6, 20:26] = 1
    labels = masks.reshape(6, -1).max(axis=1)
    raw += 0.5 * masks
    new += 0.4 * masks
    row, pixel_maps = M.evaluate_product(raw, new, masks, labels, "toy")
    ref = naive_evaluate_product(raw, new, masks, labels)
    assert set(row) == set(ref) == set(M.PIXEL_KEYS + M.IMAGE_KEYS)
    for k in ref:
        assert abs(row[k] - ref[k]) < TOL, k
    assert pixel_maps.shape == masks.shape and pixel_maps.dtype == np.float32


def test_evaluate_product_only_normal_images_warns_nan():
    rng = np.random.default_rng(16)
    raw = rng.random((3, 24, 24)).astype(np.float32)
    new = rng.random((3, 24, 24)).astype(np.float32)
    with pytest.warns(M.UndefinedMetricWarning, match="bottle"):
        row, maps = M.evaluate_product(raw, new, np.zeros((3, 24, 24)), np.zeros(3), "bottle")
    for k in ("auroc_px", "aupro_px", "aupro_px_official", "ap_px", "f1_px", "iou", "threshold",
              "auroc_sp", "ap_sp", "f1_sp"):
        assert math.isnan(row[k]), k
    assert maps.shape == (3, 24, 24)
    table = M.format_table({"bottle": row})
    assert "nan" in table


def test_evaluate_product_without_normal_images_keeps_defined_metrics():
    rng = np.random.default_rng(17)
    raw = rng.random((2, 16, 16)).astype(np.float32)
    new = rng.random((2, 16, 16)).astype(np.float32)
    masks = np.zeros((2, 16, 16))
    masks[:, 4:8, 4:8] = 1
    with pytest.warns(M.UndefinedMetricWarning, match="no normal images"):
        row, _ = M.evaluate_product(raw, new, masks, np.ones(2), "cable")
    assert math.isnan(row["auroc_sp"]) and row["ap_sp"] == 1.0
    assert not math.isnan(row["auroc_px"])


def test_evaluate_product_defined_product_does_not_warn():
    rng = np.random.default_rng(18)
    raw = rng.random((2, 16, 16)).astype(np.float32)
    new = rng.random((2, 16, 16)).astype(np.float32)
    masks = np.zeros((2, 16, 16))
    masks[1, 2:9, 3:7] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.evaluate_product(raw, new, masks, np.array([0, 1]), "ok")


def test_bad_input_fails_early():
    with pytest.raises(ValueError, match="raw and new"):
        M.product_maps(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="masks"):
        M.aupro_reference(np.zeros((1, 4, 4)), np.full((1, 4, 4), 255))


def test_format_table():
    rows = {
        "bottle": {"auroc_px": 0.91234, "aupro_px": 0.8, "ap_px": 0.5, "f1_px": 0.55, "iou": 0.4,
                   "auroc_sp": 0.9, "ap_sp": 0.95, "f1_sp": 0.9, "threshold": 0.12345},
        "cable": {"auroc_px": 0.8, "aupro_px": math.nan, "ap_px": 0.3, "f1_px": 0.35, "iou": 0.2,
                  "auroc_sp": 0.7, "ap_sp": 0.75, "f1_sp": 0.8, "threshold": 0.5},
    }
    lines = M.format_table(rows).splitlines()
    assert len(lines) == 5
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["objects", *M.TABLE_COLUMNS]
    assert set(lines[1]) <= {"|", "-", ":"}
    bottle = [c.strip() for c in lines[2].strip("|").split("|")]
    assert bottle[:2] == ["bottle", "91.23"] and bottle[-1] == "0.123"
    cable = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cable[2] == "nan"
    mean = [c.strip() for c in lines[4].strip("|").split("|")]
    assert mean[0] == "mean"
    assert mean[1] == "85.62"  # (91.234 + 80) / 2 = 85.617
    assert mean[2] == "80.00"  # nanmean ignores cable's nan
    assert mean[-1] == "0.312"  # (0.12345 + 0.5) / 2
    assert len({len(line) for line in lines}) == 1  # aligned
