"""Segmentation losses of VCP-CLIP training (docs/reproduction.md §7).

For each tapped layer and each branch (linear "raw" and Post-VCP "new") the model yields a
2-channel softmax map ``[B, 2, H, W]`` (channel 1 = abnormal). The training loss is, summed over
all those maps, focal loss on the 2-channel map plus binary Dice on channel 1. Losses are computed
in the input's dtype, promoted to at least float32 (fp16 maps from autocast are upcast).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["focal_loss", "dice_loss", "segmentation_loss"]


def _as_index_target(target: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """Target [B,1,H,W] or [B,H,W] with class values -> int64 [B,H,W]."""
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != (b, h, w):
        raise ValueError(f"target must be [B,1,H,W] or [B,H,W] = [{b},1,{h},{w}], "
                         f"got {list(target.shape)}")
    return target.long()  # the reference casts with .long() (its targets are exact 0/1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on class probabilities (the reference's, with no class weights).

    probs:  [B, C, H, W] probabilities (softmax output over C; C = 2 here).
    target: [B, 1, H, W] or [B, H, W], class indices (0/1 masks).
    Returns a scalar: the mean over all B*H*W pixels of ``-(1 - pt)^gamma * log(pt)`` where
    ``pt = sum_c onehot_c * p_c + smooth`` and the one-hot target is clamped to
    ``[smooth / (C - 1), 1 - smooth]`` (= [1e-5, 1 - 1e-5] for C = 2).
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be [B,C,H,W], got {list(probs.shape)}")
    probs = _upcast(probs)
    b, c, h, w = probs.shape
    if c < 2:
        raise ValueError(f"probs needs at least 2 channels, got {c}")
    idx = _as_index_target(target, b, h, w)  # [B,H,W]
    onehot = torch.nn.functional.one_hot(idx, c).permute(0, 3, 1, 2).to(probs.dtype)  # [B,C,H,W]
    onehot = onehot.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (onehot * probs).sum(dim=1) + smooth  # [B,H,W]
    loss = -torch.pow(1.0 - pt, gamma) * torch.log(pt)
    return loss.mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Binary Dice loss: ``1 - mean_b (2 sum(p g) + 1) / (sum p + sum g + 1)``.

    prob:   [B, H, W] probability of the positive (abnormal) class, i.e. channel 1 of the map.
    target: [B, H, W] (or [B, 1, H, W]) in {0, 1}.
    Returns a scalar. Sums run over each sample's pixels; the mean is over the batch.
    """
    prob = _upcast(prob)
    if target.dim() == prob.dim() + 1 and target.shape[1] == 1:
        target = target[:, 0]
    if prob.shape != target.shape:
        raise ValueError(f"prob {list(prob.shape)} and target {list(target.shape)} must match "
                         "([B,H,W])")
    n = prob.shape[0]
    p = prob.reshape(n, -1)
    g = target.reshape(n, -1).to(prob.dtype)
    dice = (2.0 * (p * g).sum(dim=1) + smooth) / (p.sum(dim=1) + g.sum(dim=1) + smooth)  # [B]
    return 1.0 - dice.mean()


def segmentation_loss(prob_maps: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """docs/reproduction.md §7 training loss: ``sum over maps of focal(map, target) + dice(map[:,
    1], target)``.

    prob_maps: list of [B, 2, H, W] softmax maps (every tapped layer of both branches).
    target:    [B, 1, H, W] or [B, H, W] binary mask.
    """
    if len(prob_maps) == 0:
        raise ValueError("segmentation_loss needs at least one probability map")
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]  # [B,H,W]
    total = None
    for m in prob_maps:
        term = focal_loss(m, target) + dice_loss(m[:, 1], target)
        total = term if total is None else total + term
    return total
