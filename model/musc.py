"""MuSc (Li et al., ICLR 2024): zero-shot anomaly scores from the unlabeled test images alone.

Three parts, named as in the paper:

* **LNAMD** (:func:`lnamd`), local neighbourhood aggregation: one tapped layer's raw tokens,
  LayerNorm'ed over the whole image, then averaged over each patch's ``r x r`` neighbourhood, so
  that a patch describes a small region (r = 1, 3, 5: defects of different sizes).
* **MSM** (:func:`msm`), mutual scoring: a patch's Euclidean distance to its nearest patch of each
  other image of the set; the score is the mean of the smallest ``fraction`` of those distances.
  A normal patch finds close patches in most other images; an anomalous one only in the few
  images with a similar defect.
* **RsCIN** (:func:`rscin`), re-scoring with constrained image-level neighbourhood: each image
  score becomes a similarity-weighted mean of the scores of its most similar images.

:func:`musc_scores` is the patch score (LNAMD and MSM averaged over layers and r); the caller
upsamples it with :func:`model.patch_scoring.score_map` and takes each map's maximum as the image
score that :func:`rscin` re-scores. See ``docs/scoring.md``.

Everything runs on the inputs' device, outside any autocast (the same numbers wherever the
caller runs them); the similarities in the features' dtype, the scores in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .patch_scoring import CHUNK_ELEMENTS, _no_autocast

__all__ = ["MSM_FRACTION", "MUSC_R", "RSCIN_K", "lnamd", "euclidean_distance", "msm",
           "msm_min_images", "musc_scores", "rscin"]

MSM_FRACTION = 0.3  # MSM's interval average: the smallest 30% of the other images' distances
MUSC_R = (1, 3, 5)  # LNAMD's aggregation degrees
RSCIN_K = (1, 2, 3)  # RsCIN's neighbourhood sizes on MVTec-AD (MuSc uses 1, 8, 9 on VisA)


def lnamd(tokens: torch.Tensor, r: int, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """LNAMD of one tapped layer: raw tokens [N,1+L,C] (class token first, patches row-major on an
    H x H grid, L = H*H) -> L2-normalized patch features [N,L,C].

    Per image: the class token dropped, the [C,H,W] patch grid LayerNorm'ed over all of C*H*W
    with no affine parameters (one mean and one standard deviation per image, eps 1e-5), each
    channel averaged over the r x r neighbourhood of each patch (stride 1, zero padding, always
    divided by r*r, borders included), each patch vector L2-normalized. ``r`` is odd (the grid
    keeps its size). Even at r = 1 this is not plain L2 normalization: the image's mean over all
    channels and patches is subtracted first. Images are taken a few at a time (temporaries of
    at most ``chunk_elements`` entries, or one image's), so the result is the only [N,L,C].
    """
    if r < 1 or r % 2 == 0:
        raise ValueError(f"LNAMD's r must be a positive odd number, got {r}")
    n, length, width = tokens.shape[0], tokens.shape[1] - 1, tokens.shape[2]
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"{length} patch tokens (after the class token) are not a square grid")
    per_chunk = max(1, chunk_elements // (length * width))  # images at a time
    out = torch.empty(n, length, width, dtype=tokens.dtype, device=tokens.device)  # [N, L, C]
    with _no_autocast(tokens):
        for start in range(0, n, per_chunk):
            out[start:start + per_chunk] = _lnamd_images(tokens[start:start + per_chunk, 1:], r)
    return out


def _lnamd_images(patches: torch.Tensor, r: int) -> torch.Tensor:
    """:func:`lnamd` of a few images' patch tokens [n,L,C] (class token dropped) -> [n,L,C]."""
    n, length, width = patches.shape
    side = math.isqrt(length)
    # each step's input is freed as its output is made: two [n, L, C] temporaries at a time
    x = F.layer_norm(patches, patches.shape[1:])  # [n, L, C], over all of C*H*W
    x = x.view(n, side, side, width).permute(0, 3, 1, 2)  # [n, C, H, W]
    x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=True)
    x = x.permute(0, 2, 3, 1).reshape(n, length, width)  # [n, L, C]
    return F.normalize(x, dim=-1)


def euclidean_distance(similarity: torch.Tensor) -> torch.Tensor:
    """Dot product of two L2-normalized vectors -> their Euclidean distance ``sqrt(2 (1 - cos))``
    (0 where rounding makes the cosine exceed 1)."""
    return (2.0 * (1.0 - similarity)).clamp_min(0.0).sqrt()


def _msm_keep(fraction: float, n: int) -> int:
    """How many of a patch's N-1 nearest distances MSM averages: ``floor(fraction (N - 1))``."""
    return math.floor(fraction * (n - 1))


def msm_min_images(fraction: float) -> int:
    """The fewest images N of a set that MSM can score at ``fraction``: the smallest N with
    ``floor(fraction (N - 1)) >= 1`` (5 at MuSc's 0.3)."""
    n = max(2, math.ceil(1.0 / fraction))
    while _msm_keep(fraction, n) >= 1:  # float rounding may make the estimate too large ...
        n -= 1
    while _msm_keep(fraction, n) < 1:  # ... or too small
        n += 1
    return n


def msm(features: torch.Tensor, fraction: float = MSM_FRACTION,
        chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """MSM of one layer: L2-normalized features [N,L,C] of the N images of a set -> [N,L] float32.

    For each patch of image i and each other image j, the Euclidean distance to the nearest patch
    of j; the score is the mean of the ``k = floor(fraction (N - 1))`` smallest of those N-1
    distances (MuSc's interval average). ``k < 1`` (too few images) is a ValueError.

    Bounded: the query patches (all N*L, ``rows`` at a time) meet the key images ``per_key`` at a
    time, a [rows, per_key*L] similarity chunk of at most ``chunk_elements`` entries (or one key
    image's), reduced to the nearest distance to each key image: a [rows, N] table.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n, length, width = features.shape
    keep = _msm_keep(fraction, n)
    if keep < 1:
        raise ValueError(f"MSM at fraction {fraction} needs at least {msm_min_images(fraction)} "
                         f"images (k = floor(fraction * (N - 1)) >= 1), got {n}")
    flat = features.reshape(n * length, width)  # [N*L, C]
    per_key = max(1, min(n, chunk_elements // (length * length)))  # key images per chunk
    rows = max(1, chunk_elements // (per_key * length))  # query patches per chunk
    out = torch.empty(n * length, device=features.device)  # [N*L]
    image_of_row = torch.arange(n * length, device=features.device) // length  # [N*L]
    with _no_autocast(features):
        for q in range(0, n * length, rows):
            out[q:q + rows] = _msm_rows(flat[q:q + rows], image_of_row[q:q + rows], features,
                                        per_key, keep)
    return out.view(n, length)


def _msm_rows(query: torch.Tensor, own: torch.Tensor, features: torch.Tensor, per_key: int,
              keep: int) -> torch.Tensor:
    """query [R,C] patches of the images ``own`` [R] against all images' features [N,L,C] -> [R]:
    the mean of the ``keep`` smallest nearest distances to the other images."""
    n, length, width = features.shape
    nearest = torch.empty(len(query), n, device=features.device)  # [R, N]
    for k in range(0, n, per_key):
        keys = features[k:k + per_key]  # [P, L, C]
        sim = query @ keys.reshape(-1, width).T  # [R, P*L]
        best = sim.view(len(query), -1, length).amax(-1).float()  # [R, P] nearest dot product
        nearest[:, k:k + len(keys)] = euclidean_distance(best)
    nearest[torch.arange(len(query), device=features.device), own] = torch.inf  # not its own image
    return nearest.topk(keep, dim=1, largest=False).values.mean(1)


def musc_scores(layers_tokens, fraction: float = MSM_FRACTION, r_list=MUSC_R,
                chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """MuSc's patch score: per tapped layer raw tokens [N,1+L,C] of the N images of a set ->
    [N,L] float32, the mean over layers and over ``r_list`` of ``msm(lnamd(tokens, r))``.

    ``layers_tokens`` may be any iterable (a generator that stacks one layer at a time keeps only
    one stacked layer alive besides the caller's copy); one r's features are alive at a time.
    """
    r_list = tuple(r_list)
    if not r_list:
        raise ValueError("r_list is empty: give one or more aggregation degrees")
    total, count = None, 0
    for tokens in layers_tokens:
        for r in r_list:
            score = msm(lnamd(tokens, r, chunk_elements), fraction, chunk_elements)  # [N, L]
            total, count = score if total is None else total + score, count + 1
    if total is None:
        raise ValueError("no tapped layers given")
    return total / count


def rscin(scores: torch.Tensor, embeddings: torch.Tensor, k_list=RSCIN_K) -> torch.Tensor:
    """RsCIN: image scores [N] and CLIP image embeddings [N,E] of the N images of a set -> the
    re-scored image scores [N] float32.

    In MuSc an image's score is the maximum of its upsampled patch map (the caller takes it).
    ``s`` = the scores min-max normalized over the set (all 0 when they are all equal); ``W`` =
    the cosine similarities of the L2-normalized embeddings, self included; for each k of
    ``k_list`` each row of W keeps its k largest entries (its own always among them, equal
    entries in the order of the images), normalized to sum to one, ``s_k = W_k s``; the result is
    the mean of the s_k over ``k_list``. k = 1 returns s.
    """
    k_list = tuple(k_list)
    n = scores.shape[0]
    if not k_list or any(not 1 <= k <= n for k in k_list):
        raise ValueError(f"RsCIN's k_list {list(k_list)} must be one or more k in 1..{n} "
                         f"(the number of images)")
    with _no_autocast(scores):
        s = scores.float()
        span = s.max() - s.min()
        s = (s - s.min()) / torch.where(span > 0, span, 1.0)  # [N] in [0, 1]
        unit = F.normalize(embeddings.float(), dim=-1)  # [N, E]
        w = unit @ unit.T  # [N, N]
        rank = w.clone().fill_diagonal_(math.inf)  # its own image first
        order = rank.sort(dim=1, descending=True, stable=True).indices  # [N, N], ties: lowest j
        out = torch.zeros_like(s)
        for k in k_list:
            nearest = order[:, :k]  # [N, k]
            weights = w.gather(1, nearest)  # [N, k]
            weights = weights / weights.sum(1, keepdim=True)  # rows sum to one
            out += (weights * s[nearest]).sum(1)
        return out / len(k_list)
