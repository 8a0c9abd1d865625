"""Few-shot reference and mutual scores (model/patch_scoring.py) against naive per-patch loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import VCPCLIP, load_clip
from model.patch_scoring import (mutual_score, reference_memory, reference_score, score_map)


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


def naive_mutual(layers, fraction):
    """For each layer, image i and patch p: the nearest distance to every other image j, one
    patch of j at a time; the mean of the smallest round(fraction * (N-1)); mean over layers."""
    n_layers, (n_img, n, _) = len(layers), layers[0].shape
    keep = max(1, round(fraction * (n_img - 1)))
    out = torch.zeros(n_img, n, dtype=torch.float64)
    for t in layers:
        for i in range(n_img):
            for p in range(n):
                nearest = [min(1.0 - float(t[i, p] @ q) for q in t[j])
                           for j in range(n_img) if j != i]
                out[i, p] += sum(sorted(nearest)[:keep]) / keep / n_layers
    return out


@pytest.mark.parametrize("chunk", [1, 7, 50, 1 << 26])
def test_reference_score_equals_naive_loop(chunk):
    layers = [tokens(3, 9, 5, seed=s) for s in range(2)]  # B=3 images, L=9 patches, W=5
    references = [tokens(2, 9, 5, seed=10 + s) for s in range(2)]  # K=2 references
    got = reference_score(layers, reference_memory(references), chunk_elements=chunk)
    assert got.shape == (3, 9) and got.dtype == torch.float32
    assert (got.double() - naive_reference(layers, references)).abs().max() < 1e-6


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [1, 13, 200, 1 << 26])
def test_mutual_score_equals_naive_loop(fraction, chunk):
    layers = [tokens(6, 4, 3, seed=s) for s in range(3)]  # N=6 images, L=4 patches, W=3
    got = mutual_score(iter(layers), fraction, chunk_elements=chunk)  # any iterable
    assert got.shape == (6, 4) and got.dtype == torch.float32
    assert (got.double() - naive_mutual(layers, fraction)).abs().max() < 1e-6


def test_a_patch_seen_in_the_references_scores_zero():
    refs = tokens(2, 9, 5)
    query = refs[1:2].clone()  # one reference image itself
    assert reference_score([query], reference_memory([refs])).abs().max() < 1e-6


def test_mutual_score_finds_the_odd_patch():
    """Identical images but one patch of image 0: only that patch has a large mutual score, and
    one other image with the same odd patch does not hide it (it is 1 of 4 other images)."""
    base = tokens(1, 9, 8, seed=1).repeat(5, 1, 1)  # [5, 9, 8]
    odd = tokens(1, 1, 8, seed=2)[0, 0]
    base[0, 4] = odd
    base[1, 4] = odd  # the same defect in a second image
    score = mutual_score([base], fraction=0.5)  # keeps the 2 nearest of the 4 other images
    d = 1 - float((base[2] @ odd).max())  # the odd patch's distance to a normal image
    assert d > 0.2
    # nearest distances 0 (the other odd image) and d, d, d: the mean of the smallest two
    assert abs(score[0, 4] - d / 2) < 1e-6 and abs(score[1, 4] - d / 2) < 1e-6
    others = torch.ones_like(score, dtype=torch.bool)
    others[0, 4] = others[1, 4] = False
    assert score[others].abs().max() < 1e-6


def test_mutual_score_rejects_a_single_image():
    with pytest.raises(ValueError, match="at least 2 images"):
        mutual_score([tokens(1, 4, 3)])


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
