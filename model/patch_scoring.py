"""Scoring beyond the text prompts: patch tokens compared with other patch tokens (ours).

Two scores, both computed on the L2-normalized patch tokens of the tapped layers that the Post-VCP
branch reads (``AnomalyMaps.patch_tokens``), and both a *distance* in [0, 2] (``1 - cosine``):

* **Reference score** (few-shot, after APRIL-GAN's memory of normal patch features): a patch's
  distance to its nearest patch among the K normal reference images' patches (the *memory*),
  ``1 - max_m <p, m>``.
* **Mutual score** (no labels, after MuSc's mutual scoring mechanism): for every *other* image j
  of the set, a patch's distance to its nearest patch of j; the score is the mean of the smallest
  ``fraction`` of those N-1 distances (MuSc's "interval average"). A normal patch finds close
  patches in most other images; an anomalous one only in the few images with a similar defect,
  so taking the smallest 30% (MuSc's choice) rather than the smallest one lets a defect that
  recurs in up to ~30% of the images still stand out, while averaging over 30% of the images
  rather than all of them ignores the images that are themselves defective or shifted there.

Both are averaged over the tapped layers, then upsampled to the image like the zero-shot maps
(bilinear, ``align_corners=True``: :func:`model.vcp_clip.upsample_patches`).

Memory is bounded: similarities are computed in chunks of at most ``chunk_elements`` entries
(default 2**26, 256 MiB in float32), never all patches against all patches at once. Everything
runs on the tokens' device; the similarities in the tokens' dtype whatever autocast is active
(the same numbers wherever the caller runs them), the distances in float32.
"""
from __future__ import annotations

import torch

from .vcp_clip import upsample_patches

__all__ = ["CHUNK_ELEMENTS", "MUTUAL_FRACTION", "reference_memory", "reference_score",
           "cosine_distance", "mutual_layer", "mutual_score", "score_map"]

CHUNK_ELEMENTS = 1 << 26  # entries of one similarity chunk
MUTUAL_FRACTION = 0.3  # MuSc's interval average: the smallest 30% of the other images' distances


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def cosine_distance(similarity: torch.Tensor) -> torch.Tensor:
    """Nearest similarity -> ``1 - cosine``, the distance of the reference and mutual scores."""
    return 1.0 - similarity


def reference_memory(patch_tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """The memory of K reference images: per tapped layer ``[K, L, W] -> [K*L, W]``."""
    return [t.reshape(-1, t.shape[-1]) for t in patch_tokens]


def _nearest_reference_distance(patches: torch.Tensor, memory: torch.Tensor,
                                chunk_elements: int) -> torch.Tensor:
    """patches [B,L,W], memory [M,W] -> 1 - max cosine [B,L] float32, memory in chunks."""
    b, n, _ = patches.shape
    rows = max(1, chunk_elements // (b * n))  # memory rows per chunk: [B, L, rows] fits
    best = torch.full((b, n), -torch.inf, device=patches.device)  # [B, L]
    with _no_autocast(patches):
        for start in range(0, memory.shape[0], rows):
            sim = patches @ memory[start:start + rows].T  # [B, L, rows]
            best = torch.maximum(best, sim.amax(-1).float())
    return cosine_distance(best)


def reference_score(patch_tokens: list[torch.Tensor], memory: list[torch.Tensor],
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Per tapped layer [B,L,W] tokens and [M,W] memory -> the layer mean of the nearest-reference
    distance, [B,L] float32."""
    if len(patch_tokens) != len(memory):
        raise ValueError(f"{len(patch_tokens)} layers of tokens but {len(memory)} of memory")
    layers = [_nearest_reference_distance(t, m, chunk_elements)
              for t, m in zip(patch_tokens, memory)]
    return torch.stack(layers).mean(0)


def mutual_layer(features: torch.Tensor, keep: int, distance=cosine_distance,
                 chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """features [N,L,W] (L2-normalized) of one layer -> [N,L] float32: for each patch, the mean of
    the ``keep`` smallest of its N-1 distances to its nearest patch of each other image.

    ``distance`` maps the nearest (largest) dot product, float32, to a distance; it must decrease
    as the similarity grows, so that the nearest patch is the one of largest dot product. The
    query patches (all N*L, ``rows`` at a time) meet the key images ``per_key`` at a time: a
    [rows, per_key*L] similarity chunk, reduced to the nearest distance to each key image.
    """
    n, length, width = features.shape
    flat = features.reshape(n * length, width)  # [N*L, W]
    per_key = max(1, min(n, chunk_elements // (length * length)))  # key images per chunk
    rows = max(1, chunk_elements // (per_key * length))  # query patches per chunk
    out = torch.empty(n * length, device=features.device)  # [N*L]
    image_of_row = torch.arange(n * length, device=features.device) // length  # [N*L]
    with _no_autocast(features):
        for q in range(0, n * length, rows):
            out[q:q + rows] = _mutual_rows(flat[q:q + rows], image_of_row[q:q + rows], features,
                                           per_key, keep, distance)
    return out.view(n, length)


def _mutual_rows(query: torch.Tensor, own: torch.Tensor, features: torch.Tensor, per_key: int,
                 keep: int, distance) -> torch.Tensor:
    """query [R,W] patches of the images ``own`` [R] against all images features [N,L,W] -> [R]."""
    n, length, width = features.shape
    nearest = torch.empty(len(query), n, device=features.device)  # [R, N]
    for k in range(0, n, per_key):
        keys = features[k:k + per_key]  # [P, L, W]
        sim = query @ keys.reshape(-1, width).T  # [R, P*L]
        nearest[:, k:k + len(keys)] = distance(sim.view(len(query), -1, length).amax(-1).float())
    nearest[torch.arange(len(query), device=features.device), own] = torch.inf  # not its own image
    return nearest.topk(keep, dim=1, largest=False).values.mean(1)


def mutual_score(patch_tokens, fraction: float = MUTUAL_FRACTION,
                 chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Per tapped layer tokens [N,L,W] of the N images of a set -> the layer mean of the mutual
    score, [N,L] float32. ``patch_tokens`` may be any iterable (a generator that stacks one layer
    at a time keeps only one stacked layer alive besides the caller's copy).

    Each patch keeps ``max(1, round(fraction * (N - 1)))`` of its N-1 nearest distances."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    total, count = None, 0
    for tokens in patch_tokens:
        n = tokens.shape[0]
        if n < 2:
            raise ValueError(f"mutual scoring needs at least 2 images, got {n}")
        layer = mutual_layer(tokens, max(1, round(fraction * (n - 1))),
                             chunk_elements=chunk_elements)
        total, count = layer if total is None else total + layer, count + 1
    if total is None:
        raise ValueError("no tapped layers given")
    return total / count


def score_map(scores: torch.Tensor, size: int) -> torch.Tensor:
    """Patch scores [B,L] -> [B,S,S] float32, upsampled like the zero-shot maps."""
    return upsample_patches(scores[:, None].float(), size)[:, 0]
