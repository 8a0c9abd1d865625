"""utils/data/augment.py: determinism, image/mask alignment, photometric-only steps, reference
semantics."""

import cv2
import numpy as np
import pytest
from scipy.stats import chisquare

from utils.data.augment import (Augment, adjust_brightness, adjust_contrast, adjust_hue,
                           adjust_saturation, box_blur, brightness_contrast, build_augment,
                           color_jitter, gauss_noise, gaussian_blur, gaussian_ksize, rot90, rotate)

GEOMETRIC_ONLY = dict(p_brightness_contrast=0.0, p_noise=0.0, p_one_of=0.0)
PHOTOMETRIC_ONLY = dict(p_rotate=0.0, p_rot90=0.0)


def _textured(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (5, 5), 0)  # some structure, still colourful


def _square_pair(h=64, w=64, box=(20, 36, 14, 30)):
    """A black RGB image and a 0 mask, with the same white square in both."""
    y0, y1, x0, x1 = box
    img = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    img[y0:y1, x0:x1] = 255
    mask[y0:y1, x0:x1] = 255
    return img, mask


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


# ------------------------------------------------------------------------------ the full pipeline

def test_deterministic_under_seed():
    img, mask = _square_pair()
    img = np.maximum(img, _textured(64, 64))
    aug = build_augment()
    for seed in range(8):
        a = aug(img, mask, np.random.default_rng(seed))
        b = aug(img, mask, seed)  # an int seed is accepted too
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    outs = [aug(img, mask, s)[0] for s in range(8)]
    assert len({o.tobytes() for o in outs}) > 4  # different seeds give different samples


def test_inputs_not_modified_and_dtypes_shapes_kept():
    img, mask = _textured(40, 40), _square_pair(40, 40, (5, 20, 5, 20))[1]
    img0, mask0 = img.copy(), mask.copy()
    aug = Augment(p_rotate=1, p_rot90=1, p_brightness_contrast=1, p_noise=1, p_one_of=1)
    for seed in range(12):
        out_img, out_mask = aug(img, mask, seed)
        assert out_img.dtype == np.uint8 and out_mask.dtype == np.uint8
        assert out_img.shape == (40, 40, 3) and out_mask.shape == (40, 40)
        assert out_img.flags.c_contiguous and out_mask.flags.c_contiguous
    assert np.array_equal(img, img0) and np.array_equal(mask, mask0)


def test_non_square_quarter_turn_swaps_both():
    img = _textured(30, 50)
    mask = np.zeros((30, 50), np.uint8)
    mask[:10, :5] = 255
    shapes = set()
    aug = Augment(p_rotate=0, p_rot90=1, **{k: 0 for k in ("p_brightness_contrast", "p_noise",
                                                             "p_one_of")})
    for seed in range(20):
        o_img, o_mask = aug(img, mask, seed)
        assert o_img.shape[:2] == o_mask.shape
        shapes.add(o_mask.shape)
    assert shapes == {(30, 50), (50, 30)}


def test_mask_stays_binary():
    img, mask = _square_pair()
    aug = Augment(p_rotate=1, p_rot90=1, p_brightness_contrast=1, p_noise=1, p_one_of=1)
    for seed in range(30):
        _, out = aug(img, mask, seed)
        assert set(np.unique(out).tolist()) <= {0, 255}


def test_geometric_ops_move_image_and_mask_together():
    img, mask = _square_pair()
    aug = Augment(p_rotate=1, p_rot90=1, **{k: 0 for k in ("p_brightness_contrast", "p_noise",
                                                             "p_one_of")})
    for seed in range(20):
        o_img, o_mask = aug(img, mask, seed)
        white = o_img[..., 0] > 127
        # Bilinear (image) and nearest (mask) differ only along the square's edge.
        assert _iou(white, o_mask > 0) > 0.85
        ys, xs = np.nonzero(white)
        ym, xm = np.nonzero(o_mask)
        assert abs(ys.mean() - ym.mean()) < 1.0 and abs(xs.mean() - xm.mean()) < 1.0
        assert np.array_equal(o_img[..., 0], o_img[..., 2])  # geometry treats channels alike


def test_photometric_ops_leave_mask_untouched():
    img, mask = _textured(40, 40), _square_pair(40, 40, (5, 20, 5, 20))[1]
    aug = Augment(p_brightness_contrast=1, p_noise=1, p_one_of=1, **PHOTOMETRIC_ONLY)
    changed = 0
    for seed in range(10):
        o_img, o_mask = aug(img, mask, seed)
        assert np.array_equal(o_mask, mask)
        changed += not np.array_equal(o_img, img)
    assert changed == 10


def test_probabilities_roughly_half():
    # Each step fires with p 0.5: with everything else off, the rotate step alone changes the
    # image about half of the time.
    img, mask = _textured(24, 24), np.zeros((24, 24), np.uint8)
    aug = Augment(p_rotate=0.5, p_rot90=0, **{k: 0 for k in ("p_brightness_contrast", "p_noise",
                                                              "p_one_of")})
    fired = sum(not np.array_equal(aug(img, mask, s)[0], img) for s in range(400))
    assert 150 < fired < 250


def test_one_of_always_applies_the_chosen_transform():
    # albumentations 1.x force-applies the transform OneOf picks (inner p's are only weights).
    img, mask = _textured(32, 32), np.zeros((32, 32), np.uint8)
    aug = Augment(p_one_of=1.0, p_brightness_contrast=0, p_noise=0, **PHOTOMETRIC_ONLY)
    assert all(not np.array_equal(aug(img, mask, s)[0], img) for s in range(30))
    literal = Augment(p_one_of=1.0, inner_p=0.5, p_brightness_contrast=0, p_noise=0,
                      **PHOTOMETRIC_ONLY)
    unchanged = sum(np.array_equal(literal(img, mask, s)[0], img) for s in range(200))
    assert 60 < unchanged < 140


def test_bad_inputs_raise():
    aug = Augment()
    with pytest.raises(ValueError, match="RGB"):
        aug(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), 0)
    with pytest.raises(ValueError, match="uint8"):
        aug(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), 0)
    with pytest.raises(ValueError, match="differs"):
        aug(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8), 0)


# --------------------------------------------------------------------------- the building blocks

def test_rotate_90_is_exact_quarter_turn_and_border_reflects():
    img, mask = _textured(33, 33), _square_pair(33, 33, (2, 10, 3, 20))[1]
    r_img, r_mask = rotate(img, mask, 90.0)  # positive angle = counter-clockwise (OpenCV)
    q_img, q_mask = rot90(img, mask, 1)  # np.rot90: counter-clockwise
    assert np.array_equal(r_mask, q_mask)
    assert np.abs(r_img.astype(int) - q_img.astype(int)).max() <= 1  # fixed-point bilinear
    # Reflect-101 border: a constant image stays constant (no black corners) after any angle.
    const = np.full((21, 31, 3), 77, np.uint8)
    r_const, r_zero = rotate(const, np.zeros((21, 31), np.uint8), 30.0)
    assert (r_const == 77).all() and (r_zero == 0).all()


def test_brightness_contrast_formula_truncates():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out = brightness_contrast(img, alpha=1.1, beta=0.1)
    expected = np.clip(np.arange(256) * np.float32(1.1) + np.float32(25.5), 0, 255).astype(np.uint8)
    assert np.array_equal(out[..., 0].ravel(), expected)
    assert out[0, 1, 0] == 26  # 1 * 1.1 + 25.5 = 26.6 -> truncated to 26, not rounded to 27
    assert np.array_equal(brightness_contrast(img, 1.0, 0.0), img)


def test_gauss_noise_scale():
    img = np.full((64, 64, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, np.sqrt(30.0), size=img.shape).astype(np.float32)
    out = gauss_noise(img, noise)
    assert np.array_equal(out, np.clip(128 + noise, 0, 255).astype(np.uint8))
    # Through the pipeline: one variance in [10, 50] per image, independent per channel.
    aug = Augment(p_noise=1, p_brightness_contrast=0, p_one_of=0, **PHOTOMETRIC_ONLY)
    for seed in range(5):
        diff = aug(img, np.zeros((64, 64), np.uint8), seed)[0].astype(float) - 128
        assert np.sqrt(10) - 0.5 < diff.std() < np.sqrt(50) + 0.5
        assert not np.array_equal(diff[..., 0], diff[..., 1])


def test_blurs_and_jitter():
    img = _textured(20, 24)
    assert np.array_equal(box_blur(img, 3), cv2.blur(img, (3, 3)))
    for k in (3, 5, 7):
        assert np.array_equal(gaussian_blur(img, k), cv2.GaussianBlur(img, (k, k), 0))
    with pytest.raises(ValueError):
        gaussian_blur(img, 4)
    assert np.array_equal(color_jitter(img, 1.0, 1.0, 1.0, 0.0), img)
    out = color_jitter(img, 1.1, 0.9, 1.2, 0.1, order=[3, 2, 1, 0])
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)


def _pixels(*rgb):
    """An RGB uint8 image [1,N,3] of the given pixels."""
    return np.array([rgb], dtype=np.uint8)


def test_gauss_noise_adds_in_float64():
    img = np.full((1, 5, 3), 100, np.uint8)
    noise = np.array([1 - 1e-9, -1e-9, 0.5, 200.0, -200.0])[None, :, None].repeat(3, axis=2)
    # In float32, 100 + (1 - 1e-9) and 100 - 1e-9 would round to 101 and 100 before truncation.
    assert gauss_noise(img, noise)[0, :, 0].tolist() == [100, 99, 100, 255, 0]


def test_gaussian_ksize_maps_even_draws_to_the_next_odd_size():
    class Fixed:  # a generator whose integer draw is fixed; records the bounds asked for
        def __init__(self, value):
            self.value, self.bounds = value, None

        def integers(self, low, high):
            self.bounds = (low, high)
            return self.value

    sizes = []
    for value in range(3, 8):  # the five equally likely draws: exact counts 1 / 2 / 2
        rng = Fixed(value)
        sizes.append(gaussian_ksize(rng))
        assert rng.bounds == (3, 8)
    assert sizes == [3, 5, 5, 7, 7]
    with pytest.raises(ValueError, match="odd"):
        Augment(gaussian_blur_limit=(3, 8))


def test_gaussian_ksize_frequencies():
    draws = [gaussian_ksize(np.random.default_rng(seed)) for seed in range(20000)]
    counts = [draws.count(k) for k in (3, 5, 7)]
    assert chisquare(counts, [4000, 8000, 8000]).pvalue > 1e-3
    assert chisquare(counts).pvalue < 1e-20  # a uniform draw over the three sizes is ruled out


def test_grey_is_opencv_rounded():
    # Saturation 0 returns the grey image: round(0.299 R + 0.587 G + 0.114 B) in OpenCV's
    # fixed point (19596 R + 38470 G + 7470 B + 2^15) >> 16.
    img = _pixels((0, 12, 4), (0, 0, 250), (50, 0, 0), (100, 100, 0))
    grey = adjust_saturation(img, 0.0)
    assert np.array_equal(grey[..., 0], grey[..., 2]) and np.array_equal(grey[..., 1], grey[..., 2])
    # 7.5 -> 8; 28.5 -> 28 (the fixed point puts it just under .5); 14.95 -> 15 (not floored to
    # 14); 88.6 -> 89.
    assert grey[0, :, 0].tolist() == [8, 28, 15, 89]
    rgb = np.random.default_rng(0).integers(0, 256, size=(1, 100000, 3)).astype(np.uint8)
    r, g, b = (rgb[0, :, i].astype(np.int64) for i in range(3))
    fixed = (19596 * r + 38470 * g + 7470 * b + 2 ** 15) >> 16
    assert np.array_equal(adjust_saturation(rgb, 0.0)[0, :, 0], fixed)


def test_saturation_blend_rounds_and_saturates():
    img = _pixels((200, 100, 50), (101, 0, 0))  # greys 124 (124.2) and 30 (30.199)
    # 1.1 * 200 - 0.1 * 124 = 207.6 -> 208 (rounded, not truncated); 0 - 0.1 * 30 -> 0.
    assert adjust_saturation(img, 1.1).tolist() == [[[208, 98, 43], [108, 0, 0]]]
    assert adjust_saturation(img, 0.9).tolist() == [[[192, 102, 57], [94, 3, 3]]]


def test_hue_shift_in_2_degree_bins():
    img = _pixels((200, 0, 0))  # OpenCV HSV (0, 255, 200); one bin (2 degrees) adds 200/30 to G
    assert adjust_hue(img, 0.004).tolist() == [[[200, 0, 0]]]  # +0.72 bin: floored, unchanged
    assert adjust_hue(img, 0.006).tolist() == [[[200, 7, 0]]]  # +1.08 bins: one bin
    assert adjust_hue(img, 0.02).tolist() == [[[200, 20, 0]]]  # +3.6 bins: three bins
    assert adjust_hue(img, -0.004).tolist() == [[[200, 0, 7]]]  # -0.72 bin: down one bin (179)
    assert adjust_hue(img, -0.006).tolist() == [[[200, 0, 13]]]  # -1.08 bins: down two (178)
    assert adjust_hue(img, 0.0) is img  # no shift: no HSV round trip


def test_brightness_and_contrast_truncate_in_float64():
    # float64 products, truncated: 1.05 * 60 = 63 (in float32 62.999996 -> 62), 1.05 * 101 =
    # 106.05 -> 106, 1.15 * 100 = 114.99999999999999 -> 114 (in float32 115), 1.15 * 250 -> 255.
    assert adjust_brightness(_pixels((60, 101, 0)), 1.05).tolist() == [[[63, 106, 0]]]
    assert adjust_brightness(_pixels((100, 10, 250)), 1.15).tolist() == [[[114, 11, 255]]]
    assert adjust_brightness(_pixels((10, 101, 250)), 0.9).tolist() == [[[9, 90, 225]]]
    img = _pixels((50, 0, 0), (0, 12, 4))  # greys 15 and 8: mean 11.5
    # 0.8 * v + 0.2 * 11.5: 42.3 -> 42, 2.3 -> 2, 11.9 -> 11, 5.5 -> 5.
    assert adjust_contrast(img, 0.8).tolist() == [[[42, 2, 2], [2, 11, 5]]]
    assert (adjust_contrast(img, 0.0) == 12).all()  # factor 0: the mean rounded half up


def test_color_jitter_applies_the_four_operations_in_order():
    img = _textured(20, 24)
    out = color_jitter(img, 1.1, 0.9, 1.2, 0.1, order=[3, 2, 1, 0])
    by_hand = adjust_brightness(adjust_contrast(adjust_saturation(adjust_hue(img, 0.1), 1.2), 0.9),
                                1.1)
    assert np.array_equal(out, by_hand)
    assert not np.array_equal(out, color_jitter(img, 1.1, 0.9, 1.2, 0.1, order=[0, 1, 2, 3]))
    with pytest.raises(ValueError, match="operation"):
        color_jitter(img, 1.1, 0.9, 1.2, 0.1, order=[0, 4])


def test_one_of_draw_sequence():
    """The per-sample generator's draws, in order: five step coins, the OneOf choice, the inner
    coin, then the chosen transform's parameters (a resumed run repeats them)."""
    img, mask = _textured(24, 28), np.zeros((24, 28), np.uint8)
    aug = Augment(p_one_of=1.0, p_brightness_contrast=0, p_noise=0, **PHOTOMETRIC_ONLY)
    chosen = set()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        [rng.random() for _ in range(5)]
        choice = int(rng.integers(0, 3))
        rng.random()
        if choice == 0:
            expected = box_blur(img, 3)
        elif choice == 1:
            factors = rng.uniform(0.8, 1.2, size=3)
            hue = rng.uniform(-0.2, 0.2)
            expected = color_jitter(img, *factors.tolist(), hue, rng.permutation(4).tolist())
        else:
            expected = gaussian_blur(img, gaussian_ksize(rng))
        chosen.add(choice)
        assert np.array_equal(aug(img, mask, seed)[0], expected)
    assert chosen == {0, 1, 2}
