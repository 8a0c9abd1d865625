"""utils.evaluation.visualize: panel geometry, content of each panel, atomic PNG writing."""

import cv2
import numpy as np
import pytest

from utils.evaluation.visualize import PANEL_GAP, PANEL_HEIGHT, heatmap_overlay, make_panel, save_panel

H, W = 100, 150  # -> panels 256 x 384
WP = 384


def _inputs():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    amap = (xx / (W - 1)).astype(np.float32)  # 0 on the left, 1 on the right
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[30:60, 90:130] = 1
    return image, amap, mask


def _panel(strip, k):
    x0 = k * (WP + PANEL_GAP)
    return strip[:, x0 : x0 + WP]


def test_panel_geometry_and_gaps():
    image, amap, mask = _inputs()
    strip = make_panel(image, amap, mask, threshold=0.5)
    assert strip.shape == (PANEL_HEIGHT, 4 * WP + 3 * PANEL_GAP, 3)
    assert strip.dtype == np.uint8
    for k in range(3):
        x0 = (k + 1) * WP + k * PANEL_GAP
        assert (strip[:, x0 : x0 + PANEL_GAP] == 255).all()


def test_panel_1_is_the_resized_image_and_2_the_overlay():
    image, amap, mask = _inputs()
    strip = make_panel(image, amap, mask, threshold=0.5)
    img = cv2.resize(image, (WP, PANEL_HEIGHT), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(_panel(strip, 0), img)
    amap_r = cv2.resize(amap, (WP, PANEL_HEIGHT), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(_panel(strip, 1), heatmap_overlay(img, amap_r))


def test_heatmap_overlay_is_jet_blended_half():
    image = np.full((4, 5, 3), 100, dtype=np.uint8)
    amap = np.zeros((4, 5), dtype=np.float32)
    amap[:, 4] = 1.0
    out = heatmap_overlay(image, amap)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    jet = cv2.cvtColor(
        cv2.applyColorMap(np.array([[0, 255]], dtype=np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB
    )[0]
    expected_low = np.round(0.5 * jet[0].astype(float) + 50).astype(np.uint8)
    expected_high = np.round(0.5 * jet[1].astype(float) + 50).astype(np.uint8)
    np.testing.assert_allclose(out[0, 0], expected_low, atol=1)
    np.testing.assert_allclose(out[0, 4], expected_high, atol=1)
    assert jet[0][2] > jet[0][0] and jet[1][0] > jet[1][2]  # RGB: blue at 0, red at 1
    with pytest.raises(ValueError, match="anomaly_map"):
        heatmap_overlay(image, np.zeros((3, 5)))


def test_panel_3_threshold_and_green_contours():
    image, amap, mask = _inputs()
    strip = make_panel(image, amap, mask, threshold=0.5)
    p3 = _panel(strip, 2)
    img = _panel(strip, 0)
    gt = cv2.resize(mask, (WP, PANEL_HEIGHT), interpolation=cv2.INTER_NEAREST)
    green = (p3[..., 0] == 0) & (p3[..., 1] == 255) & (p3[..., 2] == 0)
    edge = cv2.morphologyEx(gt, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    near_edge = cv2.dilate(edge.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert green.sum() > 100
    assert near_edge[green].all()  # green only around the mask's edge
    assert green[edge].mean() > 0.5  # and most of the edge is green
    # left of the threshold (map <= 0.5) the map is zeroed: overlay of 0 over the image
    zero = heatmap_overlay(img, np.zeros(img.shape[:2], np.float32))
    left = slice(0, WP // 2 - 5)
    away = ~near_edge[:, left]
    np.testing.assert_array_equal(p3[:, left][away], zero[:, left][away])
    # right of it the map is kept: same as panel 2 away from the contours
    right = slice(WP // 2 + 5, WP)
    p2 = _panel(strip, 1)
    away = ~near_edge[:, right]
    np.testing.assert_array_equal(p3[:, right][away], p2[:, right][away])


def test_panel_4_is_the_mask_overlay():
    image, amap, mask = _inputs()
    strip = make_panel(image, amap, mask, threshold=0.5)
    gt = cv2.resize(mask, (WP, PANEL_HEIGHT), interpolation=cv2.INTER_NEAREST)
    expected = heatmap_overlay(_panel(strip, 0), gt.astype(np.float32))
    np.testing.assert_array_equal(_panel(strip, 3), expected)


def test_nan_threshold_keeps_nothing():
    image, amap, _ = _inputs()
    strip = make_panel(image, amap, np.zeros((H, W), np.uint8), threshold=float("nan"))
    img = _panel(strip, 0)
    nothing = heatmap_overlay(img, np.zeros((PANEL_HEIGHT, WP), np.float32))
    np.testing.assert_array_equal(_panel(strip, 2), nothing)


def test_save_panel_writes_png_atomically(tmp_path):
    image, amap, mask = _inputs()
    path = tmp_path / "imgs" / "bottle" / "anomaly" / "vis_zong_x.png"
    panel = save_panel(path, image, amap, mask, threshold=0.5)
    assert path.is_file()
    back = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, panel)
    assert sorted(p.name for p in path.parent.iterdir()) == ["vis_zong_x.png"]  # no temp left
    save_panel(path, image, amap, mask, threshold=0.9)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["vis_zong_x.png"]
