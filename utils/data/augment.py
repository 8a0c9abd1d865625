"""Training-time augmentation of an image and its mask together (docs/reproduction.md §7).

The reference composed albumentations 1.3.1 transforms with their default arguments::

    Rotate(limit=30, p=0.5)                 geometric  (image + mask)
    RandomRotate90(p=0.5)                   geometric  (image + mask)
    RandomBrightnessContrast(p=0.5)         photometric (image only)
    GaussNoise(p=0.5)                       photometric
    OneOf([Blur(blur_limit=3, p=0.5), ColorJitter(p=0.5), GaussianBlur(p=0.5)], p=0.5)

This module re-implements that pipeline with OpenCV / NumPy operations *(ours)*; for given
parameters every step computes albumentations 1.3.1's pixels, and every parameter is drawn from
the same distribution:

* ``Rotate``: angle ~ U(-30, 30) degrees (positive = counter-clockwise, OpenCV convention) about
  the pixel-grid centre ((W-1)/2, (H-1)/2), output size unchanged; image with bilinear
  interpolation, mask with nearest neighbour, both with ``cv2.BORDER_REFLECT_101`` borders (the
  mask is reflected exactly like the image, so the two stay aligned in the border too).
* ``RandomRotate90``: ``k`` ~ U{0, 1, 2, 3} quarter turns (``np.rot90``, counter-clockwise).
  albumentations draws ``k`` in 0..3, so when this step fires it is a no-op one time in four;
  non-square images swap height and width (image and mask together).
* ``RandomBrightnessContrast``: alpha = 1 + U(-0.2, 0.2), beta = U(-0.2, 0.2);
  ``out = clip(img * alpha + beta * 255, 0, 255)`` in float32, truncated to uint8 (a look-up
  table cast with ``astype(uint8)``, i.e. truncation, not rounding).
* ``GaussNoise``: one variance ~ U(10, 50) per image, sigma = sqrt(var), independent N(0, sigma)
  float64 noise per pixel and per channel, ``clip(img + noise, 0, 255)`` in float64, truncated.
* ``OneOf``: fires with p 0.5, then picks one of the three uniformly (the inner p's are equal, so
  they only act as equal selection weights) and **always applies it**: albumentations 1.x calls
  the chosen transform with ``force_apply=True``. ``inner_p`` reproduces a literal reading
  ("each p 0.5 inside") if one wants it; the default 1.0 is the reference behaviour.

  - box blur: ``cv2.blur`` with a 3x3 kernel;
  - colour jitter: brightness, contrast, saturation factors ~ U(0.8, 1.2), hue shift ~ U(-0.2, 0.2),
    the four operations in a random order, each with OpenCV arithmetic on uint8 (see
    ``color_jitter``);
  - Gaussian blur: an integer drawn uniformly from 3..7, an even one raised to the next odd size,
    so 3 / 5 / 7 come with probabilities 0.2 / 0.4 / 0.4; sigma 0 (OpenCV derives it from the
    size: 0.3 * ((k - 1) / 2 - 1) + 0.8).

Photometric steps touch only the image; geometric steps move image and mask together. Every random
draw comes from an explicit ``numpy.random.Generator`` passed to ``__call__``, so a seed fixes the
result (``utils.data.dataset`` seeds one per sample from torch's RNG).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "Augment",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "box_blur",
    "brightness_contrast",
    "build_augment",
    "color_jitter",
    "gauss_noise",
    "gaussian_blur",
    "gaussian_ksize",
    "rot90",
    "rotate",
]


# ----------------------------------------------------------------------------------------------
# Deterministic building blocks (no randomness inside; parameters are explicit)
# ----------------------------------------------------------------------------------------------

def rotate(image: np.ndarray, mask: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate image [H,W,C] and mask [H,W] by ``angle`` degrees (counter-clockwise) about the
    centre.

    Image: bilinear; mask: nearest (stays binary); both: reflect-101 border, size unchanged.
    """
    h, w = image.shape[:2]
    # ((W-1)/2, (H-1)/2) is the centre of the pixel grid: a 90-degree angle then maps pixels
    # exactly onto pixels (albumentations 1.x uses the same centre).
    matrix = cv2.getRotationMatrix2D(((w - 1) * 0.5, (h - 1) * 0.5), float(angle), 1.0)
    out_img = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT_101)
    out_mask = cv2.warpAffine(mask, matrix, (w, h), flags=cv2.INTER_NEAREST,
                              borderMode=cv2.BORDER_REFLECT_101)
    if out_img.ndim == 2 and image.ndim == 3:  # OpenCV drops a trailing channel axis of size 1
        out_img = out_img[:, :, None]
    return out_img, out_mask


def rot90(image: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotate image and mask by ``k`` quarter turns counter-clockwise (``np.rot90``)."""
    return (np.ascontiguousarray(np.rot90(image, k, axes=(0, 1))),
            np.ascontiguousarray(np.rot90(mask, k, axes=(0, 1))))


def brightness_contrast(image: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """albumentations-1.x brightness/contrast on uint8: ``clip(img * alpha + beta * 255)``,
    truncated."""
    lut = np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta * 255.0)
    lut = np.clip(lut, 0, 255).astype(np.uint8)  # astype truncates, as albumentations does
    return lut[image]


def gauss_noise(image: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Add a noise array of the image's shape in float64; clip to [0, 255], truncate to uint8."""
    out = image.astype(np.float64) + np.asarray(noise, dtype=np.float64)
    return np.clip(out, 0, 255).astype(np.uint8)


def box_blur(image: np.ndarray, ksize: int = 3) -> np.ndarray:
    """Mean filter with a ``ksize`` x ``ksize`` kernel (``cv2.blur``, reflect-101 border)."""
    return _keep_channels(image, cv2.blur(image, (ksize, ksize)))


def gaussian_ksize(rng: np.random.Generator, limit: tuple[int, int] = (3, 7)) -> int:
    """Gaussian-blur kernel size: one integer uniform in ``limit`` (both ends odd, included), an
    even one raised by 1; for (3, 7) the sizes 3 / 5 / 7 come with probabilities 0.2 / 0.4 / 0.4."""
    k = int(rng.integers(limit[0], limit[1] + 1))
    return k if k % 2 else k + 1


def gaussian_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    """Gaussian blur with an odd ``ksize`` and sigma derived from it by OpenCV (sigma 0)."""
    if ksize % 2 != 1:
        raise ValueError(f"gaussian_blur: ksize must be odd, got {ksize}")
    return _keep_channels(image, cv2.GaussianBlur(image, (ksize, ksize), sigmaX=0))


def color_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float,
                 hue: float, order: tuple[int, ...] | list[int] = (0, 1, 2, 3)) -> np.ndarray:
    """Colour jitter of an RGB uint8 image [H,W,3] -> [H,W,3] uint8, with OpenCV arithmetic.

    ``brightness``/``contrast``/``saturation`` are multiplicative factors (1 = unchanged), ``hue``
    a shift in [-0.5, 0.5] of the hue circle (0 = unchanged); ``order`` lists the four operations
    (0 brightness, 1 contrast, 2 saturation, 3 hue) in the order they are applied.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"color_jitter needs an RGB image [H,W,3], got shape {image.shape}")
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    params = (brightness, contrast, saturation, hue)
    for op in order:
        if op not in range(4):
            raise ValueError(f"color_jitter: unknown operation index {op}")
        image = ops[op](image, params[op])
    return image


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 [H,W,3] -> uint8: ``img * factor`` in float64, clipped to [0, 255], truncated."""
    if factor == 1:
        return image
    return _apply_lut(image, np.arange(256) * factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 [H,W,3] -> uint8: blend with the mean ``m`` of OpenCV's grey image.

    ``img * factor + m * (1 - factor)`` in float64, clipped, truncated; factor 0 gives the
    constant image ``floor(m + 0.5)``.
    """
    if factor == 1:
        return image
    mean = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean()
    if factor == 0:
        return np.full_like(image, int(mean + 0.5))
    return _apply_lut(image, np.arange(256) * factor + mean * (1 - factor))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 [H,W,3] -> uint8: ``cv2.addWeighted(img, factor, grey, 1 - factor, 0)``.

    ``grey`` is OpenCV's grey image repeated over the three channels (its rounded
    0.299 R + 0.587 G + 0.114 B); ``addWeighted`` rounds to the nearest value and saturates.
    """
    if factor == 1:
        return image
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, factor, grey, 1 - factor, 0)


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """uint8 [H,W,3] -> uint8: rotate the hue of OpenCV's uint8 HSV image by ``shift`` turns.

    OpenCV stores the hue in 180 bins of 2 degrees; the shifted bin is
    ``floor(mod(H + 180 * shift, 180))``, so a shift under one bin leaves the hue unchanged when it
    is positive and lowers it by one bin when it is negative.
    """
    if shift == 0:
        return image
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    lut = np.mod(np.arange(256) + 180 * shift, 180).astype(np.uint8)
    hsv[..., 0] = lut[hsv[..., 0]]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _apply_lut(image: np.ndarray, lut: np.ndarray) -> np.ndarray:
    # A float table of 256 values, clipped to [0, 255] and truncated (astype), indexed by the image.
    return np.clip(lut, 0, 255).astype(np.uint8)[image]


def _keep_channels(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    # OpenCV returns [H,W] for a [H,W,1] input; keep the caller's layout.
    if out.ndim == 2 and src.ndim == 3:
        out = out[:, :, None]
    return out


# ----------------------------------------------------------------------------------------------
# The random pipeline
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Augment:
    """The training augmentation (docs/reproduction.md §7): ``augment(image, mask, rng)``.

    ``image``: uint8 RGB [H,W,3]; ``mask``: uint8 [H,W] with values {0,255} (same H, W).
    Returns new arrays of the same dtypes (H and W swap after an odd quarter turn).
    ``rng``: a ``numpy.random.Generator`` (or an int seed); all randomness is drawn from it.
    The defaults are the reference's (albumentations 1.x defaults); see the module docstring.
    """

    p_rotate: float = 0.5
    rotate_limit: float = 30.0
    p_rot90: float = 0.5
    p_brightness_contrast: float = 0.5
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    p_noise: float = 0.5
    noise_var: tuple[float, float] = (10.0, 50.0)
    p_one_of: float = 0.5
    inner_p: float = 1.0  # albumentations' OneOf force-applies the chosen transform
    box_blur_ksize: int = 3
    jitter: float = 0.2  # brightness, contrast, saturation and hue limits of the colour jitter
    gaussian_blur_limit: tuple[int, int] = (3, 7)  # smallest and largest kernel size, odd

    def __post_init__(self):
        lo, hi = self.gaussian_blur_limit
        if lo % 2 != 1 or hi % 2 != 1 or lo > hi:
            raise ValueError("Gaussian blur kernel sizes must be odd and ordered (smallest, "
                             f"largest), got {self.gaussian_blur_limit}")

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator | int) -> tuple[np.ndarray, np.ndarray]:
        _check_inputs(image, mask)
        rng = np.random.default_rng(rng)  # a Generator is returned unchanged

        # --- geometric: image and mask together -------------------------------------------
        if rng.random() < self.p_rotate:
            angle = rng.uniform(-self.rotate_limit, self.rotate_limit)
            image, mask = rotate(image, mask, angle)
        if rng.random() < self.p_rot90:
            k = int(rng.integers(0, 4))  # 0..3 like albumentations' RandomRotate90
            image, mask = rot90(image, mask, k)

        # --- photometric: image only ------------------------------------------------------
        if rng.random() < self.p_brightness_contrast:
            alpha = 1.0 + rng.uniform(-self.contrast_limit, self.contrast_limit)
            beta = rng.uniform(-self.brightness_limit, self.brightness_limit)
            image = brightness_contrast(image, alpha, beta)
        if rng.random() < self.p_noise:
            var = rng.uniform(self.noise_var[0], self.noise_var[1])
            noise = rng.normal(0.0, np.sqrt(var), size=image.shape)  # float64
            image = gauss_noise(image, noise)
        if rng.random() < self.p_one_of:
            choice = int(rng.integers(0, 3))
            if rng.random() < self.inner_p:
                if choice == 0:
                    image = box_blur(image, self.box_blur_ksize)
                elif choice == 1:
                    j = self.jitter
                    factors = rng.uniform(1.0 - j, 1.0 + j, size=3)
                    hue = rng.uniform(-j, j)
                    order = rng.permutation(4).tolist()
                    image = color_jitter(image, float(factors[0]), float(factors[1]),
                                         float(factors[2]), float(hue), order)
                else:
                    image = gaussian_blur(image, gaussian_ksize(rng, self.gaussian_blur_limit))
        return image, mask


def build_augment(**overrides) -> Augment:
    """The reference's training augmentation (docs/reproduction.md §7); keyword overrides change
    single settings."""
    return Augment(**overrides)


def _check_inputs(image: np.ndarray, mask: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        raise ValueError("augment: image must be a uint8 RGB array [H,W,3], got "
                         f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError("augment: mask must be a uint8 array [H,W], got "
                         f"{getattr(mask, 'dtype', type(mask))} {getattr(mask, 'shape', '')}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"augment: mask shape {mask.shape} differs from image shape "
                         f"{image.shape[:2]}; geometric augmentation needs them equal")
