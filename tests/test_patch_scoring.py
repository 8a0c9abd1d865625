"""Few-shot reference scores (model/patch_scoring.py) against naive per-patch loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import VCPCLIP, load_clip
from model.patch_scoring import reference_memory, reference_score, score_map


def tokens(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def naive_reference(layers, references):
    """For each layer, image and patch: 1 - the best dot product over every reference patch,
    one reference patch at a time; then the mean over layers."""
    n_layers, (b, n, _) = len(layers), layers[0].shape
    out = torch.zeros(b, n, dtype=torch.float64)
    for t, ref in zip(layers, references):
        for i in range(b):
            for p in range(n):
                best = max(float(t[i, p] @ m) for image in ref for m in image)
                out[i, p] += (1.0 - best) / n_layers
    return out


@pytest.mark.parametrize("chunk", [1, 7, 50, 1 << 26])
def test_reference_score_equals_naive_loop(chunk):
    layers = [tokens(3, 9, 5, seed=s) for s in range(2)]  # B=3 images, L=9 patches, W=5
    references = [tokens(2, 9, 5, seed=10 + s) for s in range(2)]  # K=2 references
    got = reference_score(layers, reference_memory(references), chunk_elements=chunk)
    assert got.shape == (3, 9) and got.dtype == torch.float32
    assert (got.double() - naive_reference(layers, references)).abs().max() < 1e-6


def test_a_patch_seen_in_the_references_scores_zero():
    refs = tokens(2, 9, 5)
    query = refs[1:2].clone()  # one reference image itself
    assert reference_score([query], reference_memory([refs])).abs().max() < 1e-6


def test_score_map_upsamples_like_the_zero_shot_maps():
    scores = torch.arange(16.0).view(1, 16)  # a 4x4 grid
    up = score_map(scores, 10)
    assert up.shape == (1, 10, 10)
    assert up[0, 0, 0] == 0 and up[0, -1, -1] == 15  # align_corners=True keeps the corners
    assert math.isclose(float(up[0, 0, -1]), 3.0, abs_tol=1e-6)


def test_patch_tokens_are_what_the_post_vcp_branch_reads(tiny_archive, tiny_vcp_cfg):
    torch.manual_seed(0)
    model = VCPCLIP(load_clip(tiny_archive, 56), tiny_vcp_cfg).eval()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        maps = model(images)
        _, layers = model.clip.encode_image(images, tiny_vcp_cfg.features_list)
    assert len(maps.patch_tokens) == len(tiny_vcp_cfg.features_list)
    for got, layer in zip(maps.patch_tokens, layers):
        assert torch.equal(got, F.normalize(layer[:, 1:], dim=-1))  # [B, L, W]
