"""A small synthetic anomaly dataset cut from the photographs that scikit-image ships (ours).

    python dataset/synthetic.py --out_path demo_output/synthetic --seed 0

Used by ``demo.sh``: no public anomaly dataset can be downloaded everywhere, but scikit-image's
sample photographs are installed with it.  Each *product* is one photograph (``brick``,
``coffee``, ...): its normal images are crops of the same window of that photo with a few pixels
of jitter, random flips and a slight brightness change, so the normal images of a product look
alike, as in MVTec-AD.  Anomalous images are normal images with one (sometimes two) synthetic
defects whose masks are exact:

* ``stain``   a blob of one colour alpha-blended over the image;
* ``scratch`` a thin bright or dark curve (a quadratic Bezier curve, 1-3 % of the size wide);
* ``missing`` a polygon replaced by a flat dark or mean colour, or by a piece of another photo
  (one of ``DONORS``, never a product's photo);
* ``colour``  a blob whose hue, saturation or brightness is shifted.

Masks are exactly the pixels whose defect weight is > 0.5; the weight ramps from 0 to 1 over at
most ``EDGE`` pixels across the mask's boundary, so pixels outside the mask change only within
``EDGE`` pixels of it (``tests/test_synthetic.py`` checks this).

Output: two source roots in the plain *folder* layout (``dataset/layouts/folder.py``)::

    <out_path>/src_aux/<product>/{good,anomaly,masks}/*.png      auxiliary (training) products
    <out_path>/src_target/<product>/{good,anomaly,masks}/*.png   unseen target products
    <out_path>/src_target/<product>/train/*.png    with --target_n_train: normal references

which ``dataset/make_dataset_new.py --layout folder`` converts like any user-made dataset.
Everything is a deterministic function of ``--seed`` (and the other arguments); each product
draws from its own generator, so adding or removing a product does not change the others.
"""

from __future__ import annotations

import argparse
import functools
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a script from anywhere: make `dataset.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = ["SOURCES", "DEFECTS", "DEFAULT_AUX", "DEFAULT_TARGET", "DONORS", "load_photo",
           "load_source", "normal_image", "add_defect", "visibility", "make_product",
           "write_product", "generate", "main"]

EDGE = 2  # px: width of the soft ramp on each side of a blended defect's boundary
MIN_VISIBILITY = 30.0  # grey levels: a defect must change its pixels by this much on average
MAX_TRIES = 20  # draws of a defect before the last one is kept whatever its visibility


@dataclass(frozen=True)
class Source:
    """One product: a scikit-image photograph and the window (fractions of its size) to crop."""

    loader: str  # name of the skimage.data function
    center: tuple[float, float]  # (y, x) of the window centre, fractions of the photo's size
    side: float  # window side, fraction of the photo's shorter side
    flips: str = "h"  # random flips of the normal images: "h" (objects) or "hv" (textures)


# Photographs that ship inside scikit-image (no download: skimage.data's "legacy" files).
# Textures (brick, grass, gravel) are grey; they are stored as grey-in-RGB, as MVTec's grid/screw.
SOURCES: dict[str, Source] = {
    "brick": Source("brick", (0.5, 0.5), 0.7, "hv"),
    "gravel": Source("gravel", (0.5, 0.5), 0.7, "hv"),
    "grass": Source("grass", (0.5, 0.5), 0.7, "hv"),
    "coffee": Source("coffee", (0.45, 0.38), 0.8),
    "astronaut": Source("astronaut", (0.35, 0.45), 0.6),
    "rocket": Source("rocket", (0.5, 0.5), 0.8),
    "chelsea": Source("chelsea", (0.5, 0.5), 0.9),
    "tissue": Source("immunohistochemistry", (0.5, 0.5), 0.7, "hv"),
    "galaxy": Source("hubble_deep_field", (0.5, 0.5), 0.6, "hv"),
    "retina": Source("retina", (0.5, 0.5), 0.5),
    "coins": Source("coins", (0.5, 0.5), 0.9),
    "camera": Source("camera", (0.4, 0.5), 0.7),
    "moon": Source("moon", (0.5, 0.5), 0.7, "hv"),
    "page": Source("page", (0.5, 0.35), 0.9, ""),  # printed text: never flipped
    "cell": Source("cell", (0.5, 0.5), 0.8, "hv"),
}
# The demo's groups: textures and objects on both sides, no photo on both sides.
DEFAULT_AUX = ("brick", "gravel", "coffee", "astronaut", "tissue", "rocket", "camera")
DEFAULT_TARGET = ("grass", "chelsea", "retina", "coins", "moon", "page")
# Photos (skimage.data loaders) that only fill "missing" pieces: no product of either group, so a
# piece of an unseen target photo never appears in training data.
DONORS = ("hubble_deep_field", "colorwheel", "clock")

DEFECTS = ("stain", "scratch", "missing", "colour")


# ----------------------------------------------------------------------------------------------
# Sources and normal images


@functools.lru_cache(maxsize=None)
def load_photo(loader: str) -> np.ndarray:
    """skimage.data's photo ``loader`` as uint8 RGB [H, W, 3] (grey photos are replicated, alpha
    dropped); cached and read-only."""
    import skimage.data  # imported here: only the generator needs scikit-image

    image = np.asarray(getattr(skimage.data, loader)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    image.flags.writeable = False
    return image


def load_source(name: str) -> np.ndarray:
    """The photograph of product ``name`` as uint8 RGB [H, W, 3] (cached and read-only)."""
    if name not in SOURCES:
        raise ValueError(f"unknown product {name!r} (expected one of {', '.join(SOURCES)})")
    return load_photo(SOURCES[name].loader)


def normal_image(photo: np.ndarray, source: Source, size: int, rng: np.random.Generator,
                 jitter: float = 0.03) -> np.ndarray:
    """One normal image [size, size, 3] uint8: the product's window shifted by up to
    ``jitter`` of its side, flipped at random, resized, with a brightness change of <= 4 %."""
    h, w = photo.shape[:2]
    side = int(round(source.side * min(h, w)))
    cy, cx = source.center[0] * h, source.center[1] * w
    shift = rng.uniform(-jitter, jitter, size=2) * side
    y0 = int(np.clip(round(cy - side / 2 + shift[0]), 0, h - side))
    x0 = int(np.clip(round(cx - side / 2 + shift[1]), 0, w - side))
    crop = photo[y0:y0 + side, x0:x0 + side]
    if "h" in source.flips and rng.random() < 0.5:
        crop = crop[:, ::-1]
    if "v" in source.flips and rng.random() < 0.5:
        crop = crop[::-1]
    crop = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)
    gain = rng.uniform(0.96, 1.04)
    return np.clip(crop.astype(np.float32) * gain, 0, 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Defect shapes: a hard region (the mask) and a soft weight around it


def _blob(size: int, rng: np.random.Generator, r_min: float, r_max: float) -> np.ndarray:
    """bool [size, size]: an irregular blob (an ellipse whose radius wobbles with the angle)."""
    cy, cx = rng.uniform(0.2, 0.8, size=2) * size
    a, b = rng.uniform(r_min, r_max, size=2) * size
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    angle = np.arctan2(v / b, u / a)
    wobble = 1.0 + sum(rng.uniform(-0.15, 0.15) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                       for k in (2, 3, 5))
    return (u / a) ** 2 + (v / b) ** 2 < wobble ** 2


def _polygon(size: int, rng: np.random.Generator, r_min: float, r_max: float) -> np.ndarray:
    """bool [size, size]: a random star-shaped polygon (a chipped-off piece)."""
    cy, cx = rng.uniform(0.2, 0.8, size=2) * size
    n = int(rng.integers(4, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(r_min, r_max, n) * size
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    region = np.zeros((size, size), np.uint8)
    cv2.fillPoly(region, [np.round(pts).astype(np.int32)], 1)
    return region.astype(bool)


def _curve(size: int, rng: np.random.Generator) -> np.ndarray:
    """bool [size, size]: a thin curve (quadratic Bezier) 1-3 % of the image size wide."""
    p0, p2 = rng.uniform(0.1, 0.9, size=(2, 2)) * size
    while np.linalg.norm(p2 - p0) < 0.3 * size:  # long enough to be a scratch
        p2 = rng.uniform(0.1, 0.9, size=2) * size
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.15, size=2) * size
    t = np.linspace(0, 1, 64)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # [64, 2] as (x, y)
    region = np.zeros((size, size), np.uint8)
    thickness = max(2, int(round(rng.uniform(0.01, 0.03) * size)))
    cv2.polylines(region, [np.round(pts).astype(np.int32)], False, 1, thickness=thickness)
    return region.astype(bool)


def soft_weight(region: np.ndarray, edge: int = EDGE) -> np.ndarray:
    """float32 [H, W] in [0, 1]: 1 inside ``region`` away from its boundary, 0 outside it farther
    than ``edge`` px, a linear ramp in between; > 0.5 exactly on ``region``."""
    if edge <= 0:
        return region.astype(np.float32)
    inside = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3)
    outside = cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, 3)
    signed = np.where(region, inside - 0.5, 0.5 - outside)  # > 0 inside, < 0 outside
    weight = np.clip(0.5 + signed / (2 * edge), 0.0, 1.0).astype(np.float32)
    weight[region] = np.maximum(weight[region], 0.51)  # the mask is exactly the region
    weight[~region] = np.minimum(weight[~region], 0.49)
    return weight


def _blend(image: np.ndarray, target: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``image`` where weight is 0, ``target`` where it is 1 (float32 RGB in, float32 out)."""
    return image * (1 - weight[..., None]) + target * weight[..., None]


def _vivid_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour (float32 [3], 0-255)."""
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(170, 256), rng.integers(120, 256)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The four defect kinds: (image float32 RGB, rng, donor photo) -> (new image, mask bool)


def _stain(img, rng, donor):
    region = _blob(img.shape[0], rng, 0.05, 0.13)
    colour = _vivid_colour(rng) if rng.random() < 0.7 else rng.uniform(10, 70, 3)  # or dirt
    weight = soft_weight(region) * rng.uniform(0.65, 0.9)
    # a little texture inside the stain, so it is not perfectly flat
    texture = cv2.GaussianBlur(rng.normal(0, 12, img.shape[:2]).astype(np.float32), (0, 0), 2)
    return _blend(img, colour + texture[..., None], weight), region


def _scratch(img, rng, donor):
    region = _curve(img.shape[0], rng)
    level = rng.uniform(215, 255) if rng.random() < 0.5 else rng.uniform(0, 40)
    colour = np.full(3, level, np.float32) + rng.uniform(-15, 15, 3)
    weight = soft_weight(region, edge=1) * rng.uniform(0.85, 1.0)
    return _blend(img, colour, weight), region


def _missing(img, rng, donor):
    size = img.shape[0]
    region = _polygon(size, rng, 0.05, 0.14)
    choice = rng.random()
    if choice < 0.4:  # a hole: dark background shows through
        fill = np.broadcast_to(rng.uniform(0, 35, 3).astype(np.float32), img.shape)
    elif choice < 0.6:  # a smoothed-over patch in the image's mean colour
        fill = np.broadcast_to(img.reshape(-1, 3).mean(0) * rng.uniform(0.7, 1.3), img.shape)
    else:  # a piece of another photograph
        h, w = donor.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 0.6))
        y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        fill = cv2.resize(donor[y0:y0 + side, x0:x0 + side], (size, size),
                          interpolation=cv2.INTER_AREA).astype(np.float32)
    return _blend(img, fill, soft_weight(region, edge=1)), region


def _colour(img, rng, donor):
    region = _blob(img.shape[0], rng, 0.07, 0.16)
    u8 = np.clip(img, 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(u8, cv2.COLOR_RGB2HSV).astype(np.float32)
    grey_or_dark = hsv[..., 1][region].mean() < 40 or hsv[..., 2][region].mean() < 60
    if grey_or_dark or rng.random() < 0.3:  # a tint (hue means nothing on grey or black)
        tint = _vivid_colour(rng) / 255.0  # saturated colour, channels in [0, 1]
        shifted = np.clip(img * tint * rng.uniform(1.2, 1.8) + 60 * tint, 0, 255)
    else:  # hue turned by 50-130 degrees, saturation and brightness changed
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(25, 65) * rng.choice([-1, 1])) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1.2, 1.8) + 30, 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] * rng.choice([0.6, 1.35]), 0, 255)
        shifted = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    return _blend(img, shifted, soft_weight(region)), region


_DEFECT_FUNCS: dict[str, Callable] = {"stain": _stain, "scratch": _scratch, "missing": _missing,
                                      "colour": _colour}


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator,
               donor: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Add one defect of ``kind`` to ``image`` (uint8 RGB [S, S, 3]).

    Returns (new image uint8 [S, S, 3], mask uint8 [S, S] with values 0/255). ``donor`` (uint8
    RGB, any size) is the photo a ``missing`` piece may be filled from; default: the image."""
    if kind not in _DEFECT_FUNCS:
        raise ValueError(f"unknown defect {kind!r} (expected one of {', '.join(DEFECTS)})")
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.dtype != np.uint8:
        raise ValueError(f"image: expected square uint8 RGB [S, S, 3], got {image.dtype} "
                         f"{image.shape}")
    donor = image if donor is None else donor
    for _ in range(MAX_TRIES):  # redraw a defect that would hardly be visible (a dark hole in a
        out, region = _DEFECT_FUNCS[kind](image.astype(np.float32), rng, donor)  # dark photo)
        out = np.clip(out, 0, 255).round().astype(np.uint8)
        if visibility(image, out, region) >= MIN_VISIBILITY:
            break
    return out, np.where(region, 255, 0).astype(np.uint8)


def visibility(before: np.ndarray, after: np.ndarray, region: np.ndarray) -> float:
    """Mean over the region's pixels of the largest per-channel change (grey levels)."""
    diff = np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=2)
    return float(diff[region > 0].mean()) if region.any() else 0.0


# ----------------------------------------------------------------------------------------------
# Products and the two groups


def _product_rng(seed: int, product: str) -> np.random.Generator:
    """A generator that depends only on ``seed`` and the product's name."""
    return np.random.default_rng([seed, zlib.crc32(product.encode())])


def make_product(product: str, n_good: int, n_anomalous: int, size: int, seed: int):
    """Yield ``(file stem, kind or None, image uint8 RGB, mask uint8 0/255 or None)`` for one
    product: ``n_good`` normal images, then ``n_anomalous`` images with defects whose kinds take
    turns (from a random first kind), so every kind is equally common. A function of ``seed`` and
    the product only."""
    rng = _product_rng(seed, product)
    source, photo = SOURCES[product], load_source(product)
    donors = [d for d in DONORS if d != source.loader]
    for i in range(n_good):
        yield f"{i:03d}", None, normal_image(photo, source, size, rng), None
    first = int(rng.integers(len(DEFECTS)))
    kinds = [DEFECTS[(first + i) % len(DEFECTS)] for i in range(n_anomalous)]
    for i, kind in enumerate(kinds):
        image = normal_image(photo, source, size, rng)
        donor = load_photo(donors[int(rng.integers(len(donors)))])
        image, mask = add_defect(image, kind, rng, donor)
        if rng.random() < 0.15:  # now and then a second defect of another kind
            second = DEFECTS[(DEFECTS.index(kind) + int(rng.integers(1, len(DEFECTS))))
                             % len(DEFECTS)]
            image, mask2 = add_defect(image, second, rng, donor)
            mask = np.maximum(mask, mask2)
        yield f"{i:03d}_{kind}", kind, image, mask


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_product(root: Path, product: str, n_good: int, n_anomalous: int, size: int,
                  seed: int, n_train: int = 0) -> int:
    """Write one product folder ``root/<product>/{good,anomaly,masks}`` and, with ``n_train``, its
    normal training images ``train/`` (few-shot references; drawn from a generator of their own,
    so they change no other image); return its image count."""
    rng = _product_rng(seed, f"{product}/train")
    source, photo = SOURCES[product], load_source(product)
    for i in range(n_train):
        _save_png(root / product / "train" / f"{i:03d}.png", normal_image(photo, source, size, rng))
    count = n_train
    for stem, kind, image, mask in make_product(product, n_good, n_anomalous, size, seed):
        if kind is None:
            _save_png(root / product / "good" / f"{stem}.png", image)
        else:
            _save_png(root / product / "anomaly" / f"{stem}.png", image)
            _save_png(root / product / "masks" / f"{stem}.png", mask)
        count += 1
    return count


def generate(out_path, aux: Sequence[str] = DEFAULT_AUX, target: Sequence[str] = DEFAULT_TARGET,
             size: int = 256, n_good: int = 10, n_anomalous: int = 30,
             target_n_good: Optional[int] = None, target_n_anomalous: Optional[int] = None,
             seed: int = 0, progress: bool = True, target_n_train: int = 0) -> tuple[Path, Path]:
    """Write ``<out_path>/src_aux`` and ``<out_path>/src_target``; return the two roots.

    Those two folders are deleted first if they exist (a stale image would change the data);
    nothing else under ``out_path`` is touched."""
    import shutil

    overlap = sorted(set(aux) & set(target))
    if overlap:
        raise ValueError(f"products {overlap} are in both groups; the target group must be unseen")
    unknown = [p for p in (*aux, *target) if p not in SOURCES]
    if unknown:
        raise ValueError(f"unknown products {unknown} (expected some of {', '.join(SOURCES)})")
    if not aux or not target:
        raise ValueError("both the auxiliary and the target group need at least one product")
    if size < 32 or n_good < 0 or n_anomalous < 1 or target_n_train < 0:
        raise ValueError("need --size >= 32, --n_good >= 0, --n_anomalous >= 1 and "
                         "--target_n_train >= 0")
    out = Path(out_path)
    roots = out / "src_aux", out / "src_target"
    jobs = [(roots[0], p, n_good, n_anomalous, 0) for p in aux]
    jobs += [(roots[1], p, n_good if target_n_good is None else target_n_good,
              n_anomalous if target_n_anomalous is None else target_n_anomalous, target_n_train)
             for p in target]
    for root in roots:
        if root.exists():
            shutil.rmtree(root)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(g + a + t for _, _, g, a, t in jobs), desc="synthetic images",
                   unit="img")
    for root, product, good, anomalous, train in jobs:
        written = write_product(root, product, good, anomalous, size, seed, train)
        if bar is not None:
            bar.update(written)
    if bar is not None:
        bar.close()
    return roots


def _names(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_path", default="./demo_output/synthetic",
                   help="writes <out_path>/src_aux and <out_path>/src_target")
    p.add_argument("--aux", type=_names, default=list(DEFAULT_AUX),
                   help=f"comma-separated auxiliary (training) products "
                        f"(default {','.join(DEFAULT_AUX)})")
    p.add_argument("--target", type=_names, default=list(DEFAULT_TARGET),
                   help=f"comma-separated unseen target products "
                        f"(default {','.join(DEFAULT_TARGET)}); known: {', '.join(SOURCES)}")
    p.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    p.add_argument("--n_good", type=int, default=10, help="normal images per product")
    p.add_argument("--n_anomalous", type=int, default=30, help="anomalous images per product")
    p.add_argument("--target_n_good", type=int, default=None, help="default --n_good")
    p.add_argument("--target_n_anomalous", type=int, default=None, help="default --n_anomalous")
    p.add_argument("--target_n_train", type=int, default=0,
                   help="normal training images per target product (<product>/train/: the "
                        "few-shot references of test.py --k_shot; default 0)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        roots = generate(args.out_path, args.aux, args.target, args.size, args.n_good,
                         args.n_anomalous, args.target_n_good, args.target_n_anomalous, args.seed,
                         target_n_train=args.target_n_train)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {roots[0]} ({', '.join(args.aux)}) and {roots[1]} ({', '.join(args.target)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
