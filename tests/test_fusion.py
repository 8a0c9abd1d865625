"""The fusion of a patch-score map with the zero-shot maps (utils/scoring/fusion.py)."""
import numpy as np
import pytest

from utils.evaluation.metrics import BLEND_NEW, BLEND_RAW, evaluate_product
from utils.scoring import fuse_maps


@pytest.mark.parametrize("rule", ["geometric", "sum"])
def test_fuse_maps_scale_of_either_map_does_not_matter(rule):
    """Multiplying the zero-shot or the patch map by any constant leaves every metric unchanged."""
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), bool)
    masks[:2, 4:9, 4:9] = True
    zero_shot = rng.uniform(0.3, 0.7, masks.shape).astype(np.float32) + 0.2 * masks
    patch = rng.uniform(0.0, 0.2, masks.shape).astype(np.float32) + 0.1 * masks
    labels = np.array([1, 1, 0, 0])
    rows = []
    for z, p in [(zero_shot, patch), (1000 * zero_shot, patch), (zero_shot, patch / 1000)]:
        raw, new = fuse_maps(z, 0.5 * z, p, rule)
        rows.append(evaluate_product(raw, new, masks, labels, "x", sigma=1.0)[0])
    for key in ("auroc_px", "ap_px", "aupro_px", "auroc_sp"):
        assert rows[1][key] == pytest.approx(rows[0][key], abs=1e-6)
        assert rows[2][key] == pytest.approx(rows[0][key], abs=1e-6)


def test_fuse_maps_values():
    z = np.array([[[0.25, 0.5], [1.0, 0.0]]], np.float32)
    n = np.array([[[0.0, 0.5], [0.5, 0.25]]], np.float32)
    p = np.array([[[1.0, 0.5], [0.0, -1e-7]]], np.float32)  # rounding below 0 is clipped
    assert [m.tolist() for m in fuse_maps(z, n, p, "geometric")] == [
        [[[0.5, 0.5], [0.0, 0.0]]], [[[0.0, 0.5], [0.0, 0.0]]]]
    assert [m.tolist() for m in fuse_maps(z, n, p, "alone")] == [[[[1.0, 0.5], [0.0, 0.0]]]] * 2
    # sum: sd 0.5, 0.25, 0.5 -> weights 2, 4, 2; the blend's: 0.2 * 2 + 0.8 * 4 + 2 = 5.6
    z, n = (np.array([[[0, v], [0, v]]], np.float32) for v in (1.0, 0.5))
    n[0, 1] = n[0, 1, ::-1]
    p = np.array([[[1.0, 1.0], [0.0, -1e-7]]], np.float32)
    raw, new = fuse_maps(z, n, p, "sum")
    np.testing.assert_allclose(raw, [[[2 / 5.6, 4 / 5.6], [0, 2 / 5.6]]], rtol=1e-6)
    np.testing.assert_allclose(new, [[[2 / 5.6, 4 / 5.6], [2 / 5.6, 0]]], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown rule"):
        fuse_maps(z, n, p, "max")


def test_fuse_maps_sum_blend_is_a_convex_combination():
    """0.2 raw + 0.8 new of the fused maps lies between the smallest and the largest of raw, new
    and patch at every pixel, whatever their scales: fused maps keep the zero-shot scale."""
    rng = np.random.default_rng(1)
    raw, new = (rng.uniform(0, 1, (3, 8, 8)).astype(np.float32) ** k for k in (1, 3))
    patch = rng.uniform(0, 0.01, raw.shape).astype(np.float32)
    fused = fuse_maps(raw, new, patch, "sum")
    blend = BLEND_RAW * fused[0] + BLEND_NEW * fused[1]
    stacked = np.stack([raw, new, patch])
    assert (blend >= stacked.min(0) - 1e-6).all() and (blend <= stacked.max(0) + 1e-6).all()
    assert 0 <= blend.min() and blend.max() <= 1
