"""How a patch-score map joins the two zero-shot branch maps (docs/scoring.md, 'Fusion')."""
from __future__ import annotations

import numpy as np

from utils.evaluation.metrics import BLEND_NEW, BLEND_RAW, check_pair

__all__ = ["FUSIONS", "fuse_maps"]

# fuse_maps rules, the default (best measured, docs/scoring.md) first
FUSIONS = ("sum", "geometric", "alone")


def _spread(x: np.ndarray) -> np.float32:
    """Standard deviation over every pixel of the set; 1 for a constant set (nothing to scale)."""
    sd = np.float32(x.std(dtype=np.float64))
    return sd if sd > 0 else np.float32(1)


def fuse_maps(raw, new, patch, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Both zero-shot branch maps combined with a patch-score map, float32 (ours).

    Args:
        raw, new: ``[N, H, W]`` abnormal maps of the two branches (softmax probabilities).
        patch: ``[N, H, W]`` reference or mutual score (a distance ``1 - cos`` >= 0).
        rule: ``"geometric"``: ``sqrt(branch * patch)`` per pixel; ``"sum"``: ``branch / sd(branch)
            + patch / sd(patch)``, each scaled by its standard deviation over all pixels of the set
            (the images scored together), both divided by one constant of the set that makes their
            blend ``0.2 * raw + 0.8 * new`` a convex combination of raw, new and patch (so the
            fused maps keep the zero-shot maps' scale, 0 to 1); ``"alone"``: the patch map.

    Returns:
        ``(raw, new)`` fused, ``[N, H, W]`` float32 each.

    Neither map's scale can drown the other: multiplying either by a constant multiplies the
    geometric mean by a constant and leaves the sum unchanged, and a constant common to the set
    changes no metric, as the product normalization removes it (``tests/test_metrics.py``).
    """
    raw, new = check_pair(raw, new, "fuse_maps")
    patch = np.maximum(np.asarray(patch, dtype=np.float32), 0)  # 1 - cos may round below 0
    if raw.shape != patch.shape:
        raise ValueError(f"fuse_maps: shapes {raw.shape} and {patch.shape} differ")
    if rule == "geometric":
        return np.sqrt(raw * patch), np.sqrt(new * patch)
    if rule == "sum":
        w_raw, w_new, w_patch = 1 / _spread(raw), 1 / _spread(new), 1 / _spread(patch)
        total = BLEND_RAW * w_raw + BLEND_NEW * w_new + w_patch  # the blend's weights sum to 1
        return tuple((w / total) * x + (w_patch / total) * patch
                     for x, w in ((raw, w_raw), (new, w_new)))
    if rule == "alone":
        return patch, patch
    raise ValueError(f"fuse_maps: unknown rule {rule!r} (expected one of {FUSIONS})")
