"""Benchmark: the reference AUPRO as the naive per-threshold loop vs utils.evaluation.metrics,
same maps.

    python bench/metrics.py                 # 60 maps of 518 x 518 (an MVTec-AD-sized product)
    python bench/metrics.py --n 4 --size 64 # CI smoke

Also times pixel AUROC / AP / F1 (three scikit-learn calls vs one sort) unless --no-pixel, and
two products' whole metrics (``evaluate_product``) in 2 threads vs one after the other, as
test.py's metric threads run them (how far the GIL lets them scale).
Asserts the values agree (|diff| < 1e-9); the LAST line is the AUPRO ratio, ``speedup: <ratio>x``.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from tests.helpers.naive_metrics import naive_aupro_reference, naive_pixel_metrics  # noqa: E402
from utils.evaluation.metrics import aupro_reference, evaluate_product, pixel_metrics  # noqa: E402

TOL = 1e-9


def synthetic_product(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(maps [n, size, size] float32 in [0, 1], masks [n, size, size] uint8)``: smooth noise,
    every other image with 1-4 elliptic defects (some overlapping) that raise the map."""
    rng = np.random.default_rng(seed)
    maps = np.empty((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    low = max(4, size // 8)
    for i in range(n):
        noise = rng.random((low, low)).astype(np.float32)
        maps[i] = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
        if i % 2 == 0:
            continue
        for _ in range(rng.integers(1, 5)):
            center = tuple(int(c) for c in rng.integers(size // 8, size - size // 8, 2))
            axes = tuple(int(a) for a in rng.integers(max(1, size // 64), max(2, size // 10), 2))
            cv2.ellipse(masks[i], center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        soft = cv2.GaussianBlur(masks[i].astype(np.float32), (0, 0), max(1.0, size / 100))
        maps[i] += np.float32(rng.uniform(0.3, 0.8)) * soft
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    return maps.astype(np.float32), masks


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=60, help="number of maps (default 60)")
    parser.add_argument("--size", type=int, default=518, help="map side in pixels (default 518)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pixel", action="store_true", help="skip the AUROC/AP/F1 timing")
    args = parser.parse_args(argv)

    maps, masks = synthetic_product(args.n, args.size, args.seed)
    n_regions = "regions on {} of {} maps".format(int(masks.any(axis=(1, 2)).sum()), args.n)
    print(f"maps: {args.n} x {args.size} x {args.size} float32, {n_regions}, "
          f"{masks.mean() * 100:.2f}% anomalous pixels")

    if not args.no_pixel:
        ref, t_ref = _timed(naive_pixel_metrics, maps, masks)
        ours, t_ours = _timed(pixel_metrics, maps, masks)
        for k in ref:
            assert abs(ours[k] - ref[k]) < TOL, (k, ours[k], ref[k])
        print(f"pixel AUROC/AP/F1/IoU  scikit-learn x3: {t_ref:8.3f} s   one sort: {t_ours:8.3f} s"
              f"   ({t_ref / t_ours:.1f}x)  auroc_px={ours['auroc_px']:.6f}")

    product = (maps, maps, masks, masks.any(axis=(1, 2)), "bench")
    _, t_one = _timed(lambda: [evaluate_product(*product) for _ in range(2)])
    with ThreadPoolExecutor(2) as pool:
        _, t_two = _timed(lambda: list(pool.map(lambda _: evaluate_product(*product), range(2))))
    print(f"2 products' metrics     one after the other: {t_one:6.3f} s   in 2 threads: "
          f"{t_two:6.3f} s   ({t_one / t_two:.2f}x)")

    ref, t_ref = _timed(naive_aupro_reference, maps, masks)
    ours, t_ours = _timed(aupro_reference, maps, masks)
    assert abs(ours - ref) < TOL, (ours, ref)
    print(f"reference AUPRO        naive loop:      {t_ref:8.3f} s   ours:     {t_ours:8.3f} s"
          f"   aupro={ours:.12f} (naive {ref:.12f})")
    ratio = t_ref / t_ours
    print(f"speedup: {ratio:.1f}x")
    return ratio


if __name__ == "__main__":
    main()
