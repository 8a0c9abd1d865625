"""Greedy coreset subsampling of a memory of normal patch features (as PatchCore, Roth et al.,
CVPR 2022): a few patches that cover all the others, so that a memory of many reference images
stays small.

Farthest-point selection: start at the patch farthest from the memory's mean, then repeatedly
take the patch farthest from everything taken so far. Distances are Euclidean, measured on a
random Gaussian projection of the features to ``projection_dim`` dimensions (none when the
features have no more dimensions than that): distances are nearly kept (Johnson-Lindenstrauss)
at a fraction of the cost. Memory: the projected features [M, projection_dim] float32, a few
[M] vectors (each patch's distance to the nearest patch taken) and temporaries of at most 2**24
entries; never an [M, M] matrix.
"""
from __future__ import annotations

import torch

__all__ = ["PROJECTION_DIM", "coreset_size", "greedy_coreset"]

PROJECTION_DIM = 128
_CHUNK_ELEMENTS = 1 << 24  # entries of a temporary [rows, C] or [rows, D] at a time


def coreset_size(m: int, ratio: float) -> int:
    """Patches kept of a memory of ``m``: ``max(1, round(ratio * m))`` (Python's round)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return max(1, round(ratio * m))


def _project(features: torch.Tensor, seed: int, projection_dim: int) -> torch.Tensor:
    """features [M,C] -> float32 [M,D]: ``features @ P`` with P [C,D] standard normal, drawn on
    the CPU from ``seed`` (the same P on any device); the features themselves when C <= D."""
    m, width = features.shape
    if width <= projection_dim:
        return features.float()
    generator = torch.Generator().manual_seed(seed)
    proj = torch.randn(width, projection_dim, generator=generator).to(features.device)  # [C, D]
    rows = max(1, _CHUNK_ELEMENTS // width)
    out = torch.empty(m, projection_dim, device=features.device)  # [M, D]
    for start in range(0, m, rows):
        out[start:start + rows] = features[start:start + rows].float() @ proj
    return out


def _farthest_points(x: torch.Tensor, m: int) -> torch.Tensor:
    """x [M,D] float32 -> the indices [m] of farthest-point selection, in the order taken."""
    rows = max(1, _CHUNK_ELEMENTS // x.shape[1])
    squared = torch.cat([(part * part).sum(1) for part in x.split(rows)])  # [M] |x|^2
    nearest = torch.full_like(squared, torch.inf)  # [M] distance^2 to the nearest taken
    chosen = torch.empty(m, dtype=torch.long, device=x.device)  # [m]
    index = torch.addmv(squared, x, x.mean(0), alpha=-2.0).argmax()  # farthest from the mean
    for step in range(m):
        chosen[step] = index
        taken = index.view(1)  # [1], a tensor: no wait for the device
        to_taken = torch.addmv(squared + squared.index_select(0, taken), x,
                               x.index_select(0, taken)[0], alpha=-2.0)  # [M] distance^2
        torch.minimum(nearest, to_taken.clamp_min_(0.0), out=nearest)
        nearest.index_fill_(0, taken, -torch.inf)  # never taken again
        index = nearest.argmax()
    return chosen


def greedy_coreset(features: torch.Tensor, ratio: float, seed: int = 0,
                   projection_dim: int = PROJECTION_DIM) -> torch.Tensor:
    """features [M,C] -> the sorted indices [m] (int64, on the features' device) of a greedy
    coreset of ``m = coreset_size(M, ratio)`` patches; ratio 1.0 returns ``arange(M)``.

    Ties go to the lowest index; a patch is never taken twice (duplicates of taken patches
    are taken only once nothing else is left). Each of the m steps reads the projected features
    once (time O(m M D)). The projection is the same on any device; the distances are float32
    arithmetic, so two devices agree unless two candidates tie to rounding.
    """
    m_total = features.shape[0]
    m = coreset_size(m_total, ratio)
    if m == m_total:
        return torch.arange(m_total, device=features.device)
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        x = _project(features, seed, projection_dim)  # [M, D]
        return _farthest_points(x, m).sort().values
