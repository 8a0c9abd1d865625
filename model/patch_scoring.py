"""Few-shot scoring beyond the text prompts: patch tokens compared with a memory of normal
reference images' patch tokens (ours, after APRIL-GAN, VAND 2023).

The **reference score** is computed on the L2-normalized patch tokens of the tapped layers that
the Post-VCP branch reads (``AnomalyMaps.patch_tokens``): a patch's distance ``1 - max_m <p, m>``
(in [0, 2]) to its nearest patch among the K reference images' patches (the *memory*, which
``model/coreset.py`` may subsample), averaged over the tapped layers, then upsampled to the image
like the zero-shot maps (bilinear, ``align_corners=True``:
:func:`model.vcp_clip.upsample_patches`). MuSc's mutual scoring (no references) is
``model/musc.py``.

Memory is bounded: similarities are computed in chunks of at most ``chunk_elements`` entries
(default 2**26, 256 MiB in float32), never all patches against all memory patches at once.
Everything runs on the tokens' device; the similarities in the tokens' dtype whatever autocast is
active (the same numbers wherever the caller runs them), the distances in float32.
"""
from __future__ import annotations

import torch

from .coreset import greedy_coreset
from .vcp_clip import upsample_patches

__all__ = ["CHUNK_ELEMENTS", "reference_memory", "reference_score", "cosine_distance",
           "score_map"]

CHUNK_ELEMENTS = 1 << 26  # entries of one similarity chunk


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def cosine_distance(similarity: torch.Tensor) -> torch.Tensor:
    """Nearest similarity -> ``1 - cosine``, the distance of the reference score."""
    return 1.0 - similarity


def reference_memory(patch_tokens, coreset: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    """The memory of K reference images: per tapped layer ``[K, L, W] -> [K*L, W]``, or with
    ``coreset`` < 1 its greedy coreset ``[m, W]``, ``m = coreset_size(K*L, coreset)``
    (:func:`model.coreset.greedy_coreset`, projection seeded with ``seed``).

    ``patch_tokens`` may be any iterable: a generator that stacks one layer at a time keeps one
    whole layer alive besides the memory built so far and the caller's copy."""
    memory = []
    for tokens in patch_tokens:
        full = tokens.reshape(-1, tokens.shape[-1])  # [K*L, W]
        memory.append(full if coreset == 1.0 else full[greedy_coreset(full, coreset, seed)])
    return memory


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


def score_map(scores: torch.Tensor, size: int) -> torch.Tensor:
    """Patch scores [B,L] -> [B,S,S] float32, upsampled like the zero-shot maps."""
    return upsample_patches(scores[:, None].float(), size)[:, 0]
