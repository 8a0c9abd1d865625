"""MuSc (model/musc.py): LNAMD, MSM and RsCIN against naive per-image, per-patch and per-row loops,
and the raw tokens and image embeddings that the model hands them."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import VCPCLIP, load_clip
from model.musc import lnamd, msm, msm_min_images, musc_scores, rscin


def raw_tokens(n, side, width, seed=0):
    """Raw block-output-like tokens [N, 1+side*side, C], float64, with an offset and a scale per
    image so that LayerNorm's mean and standard deviation matter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1 + side * side, width, generator=g, dtype=torch.float64)
    return x * torch.rand(n, 1, 1, generator=g, dtype=torch.float64) * 3 + torch.randn(
        n, 1, 1, generator=g, dtype=torch.float64)


def naive_lnamd(tokens, r):
    """One image at a time: the [C, H, W] grid of patches (row-major), LayerNorm by hand, explicit
    zero padding, r x r sums divided by r*r, each patch vector divided by its norm."""
    n, length, width = tokens.shape[0], tokens.shape[1] - 1, tokens.shape[2]
    side, pad = int(round(length ** 0.5)), (r - 1) // 2
    out = torch.zeros(n, length, width, dtype=torch.float64)
    for i in range(n):
        grid = torch.zeros(width, side, side, dtype=torch.float64)
        for p in range(length):
            grid[:, p // side, p % side] = tokens[i, 1 + p]
        mean = grid.sum() / grid.numel()
        var = ((grid - mean) ** 2).sum() / grid.numel()
        grid = (grid - mean) / math.sqrt(var + 1e-5)
        padded = torch.zeros(width, side + 2 * pad, side + 2 * pad, dtype=torch.float64)
        padded[:, pad:pad + side, pad:pad + side] = grid
        for h in range(side):
            for w in range(side):
                total = torch.zeros(width, dtype=torch.float64)
                for dy in range(r):
                    for dx in range(r):
                        total += padded[:, h + dy, w + dx]
                vector = total / (r * r)
                out[i, h * side + w] = vector / math.sqrt(float((vector ** 2).sum()))
    return out


def naive_msm(features, fraction):
    """One patch at a time: its Euclidean distance ||a - b|| to every patch of every other image,
    the nearest per image, the mean of the floor(fraction * (N-1)) smallest."""
    n, length, _ = features.shape
    keep = int(fraction * (n - 1))
    out = torch.zeros(n, length, dtype=torch.float64)
    for i in range(n):
        for p in range(length):
            nearest = [min(float((features[i, p] - q).norm()) for q in features[j])
                       for j in range(n) if j != i]
            out[i, p] = sum(sorted(nearest)[:keep]) / keep
    return out


def naive_rscin(scores, embeddings, k_list):
    """One row at a time: min-max scores, cosines by hand, the row's own image then its most
    similar ones, weights divided by their sum."""
    n = len(scores)
    lo, hi = min(scores), max(scores)
    s = [(x - lo) / (hi - lo) for x in scores]
    unit = [e / math.sqrt(float((e ** 2).sum())) for e in embeddings]
    out = [0.0] * n
    for i in range(n):
        w = [float(unit[i] @ unit[j]) for j in range(n)]
        order = sorted(range(n), key=lambda j: (j != i, -w[j]))  # itself first
        for k in k_list:
            kept = order[:k]
            out[i] += sum(w[j] * s[j] for j in kept) / sum(w[j] for j in kept) / len(k_list)
    return torch.tensor(out, dtype=torch.float64)


# LNAMD

@pytest.mark.parametrize("r", [1, 3, 5])
@pytest.mark.parametrize("side", [2, 3, 4])
def test_lnamd_equals_naive_loop(r, side):
    """N = 5 images; r = 3 and 5 on grids of 2 to 4 patches a side: every patch at or near a
    border, and r = 5 wider than the grid."""
    tokens = raw_tokens(5, side, 6, seed=side * 10 + r)
    got = lnamd(tokens, r)
    assert got.shape == (5, side * side, 6) and got.dtype == torch.float64
    assert (got - naive_lnamd(tokens, r)).abs().max() < 1e-12


def test_lnamd_at_r_1_subtracts_the_image_mean_first():
    """By hand: 2 x 2 patches of 2 channels. Their 8 values sum to 16: the mean 2 is subtracted,
    p0 = (2, 0) -> (0, -2) -> (0, -1), where plain L2 normalization would give (1, 0). The
    standard deviation only scales and so disappears in the L2 normalization; the class token
    (large on purpose) is dropped."""
    tokens = torch.tensor([[[100.0, -100.0], [2, 0], [0, 2], [3, 1], [4, 4]]])  # [1, 1+4, 2]
    h = 1 / math.sqrt(2)
    want = torch.tensor([[[0.0, -1], [-1, 0], [h, -h], [h, h]]])
    assert (lnamd(tokens, 1) - want).abs().max() < 1e-6
    plain = F.normalize(tokens[:, 1:], dim=-1)
    assert (plain[0, 0] - torch.tensor([1.0, 0])).abs().max() < 1e-6  # not what LNAMD gives


def test_lnamd_at_r_3_on_a_2x2_grid_averages_the_whole_grid_over_9():
    """By hand, the same tokens: each patch's 3 x 3 window holds all 4 patches and 5 zeros; the
    centered channel sums are (0 - 2 + 1 + 2, -2 + 0 - 1 + 2) = (1, -1), so every patch gets
    (1, -1) / 9 / std -> (1, -1) / sqrt(2)."""
    tokens = torch.tensor([[[100.0, -100.0], [2, 0], [0, 2], [3, 1], [4, 4]]])
    h = 1 / math.sqrt(2)
    assert (lnamd(tokens, 3) - torch.tensor([h, -h])).abs().max() < 1e-6


@pytest.mark.parametrize("chunk", [1, 9 * 4, 2 * 9 * 4 + 1, 1 << 26])
def test_lnamd_a_few_images_at_a_time_equals_all_at_once(chunk):
    """chunk 1 and 36 entries: one image (9 patches x 4 channels) at a time; 73: two."""
    tokens = raw_tokens(5, 3, 4, seed=9)
    for r in (1, 3):
        assert torch.equal(lnamd(tokens, r, chunk_elements=chunk), lnamd_all_at_once(tokens, r))


def lnamd_all_at_once(tokens, r):
    """The same per-image operations with all images at once (no chunks)."""
    n, length, width = tokens.shape[0], tokens.shape[1] - 1, tokens.shape[2]
    side = math.isqrt(length)
    x = F.layer_norm(tokens[:, 1:], (length, width)).view(n, side, side, width)
    x = F.avg_pool2d(x.permute(0, 3, 1, 2), r, stride=1, padding=r // 2, count_include_pad=True)
    return F.normalize(x.permute(0, 2, 3, 1).reshape(n, length, width), dim=-1)


@pytest.mark.parametrize("r", [0, 2, -1])
def test_lnamd_rejects_an_even_or_non_positive_r(r):
    with pytest.raises(ValueError, match="positive odd"):
        lnamd(raw_tokens(2, 2, 3), r)


def test_lnamd_rejects_a_grid_that_is_not_square():
    with pytest.raises(ValueError, match="not a square grid"):
        lnamd(torch.randn(2, 1 + 6, 3), 1)


# MSM

@pytest.mark.parametrize("n, fraction", [(5, 0.3), (5, 1.0), (7, 0.5), (11, 0.1)])
@pytest.mark.parametrize("chunk", [1, 7, 50, 1 << 26])
def test_msm_equals_naive_loop(n, fraction, chunk):
    features = F.normalize(torch.randn(n, 4, 3, generator=torch.Generator().manual_seed(n),
                                       dtype=torch.float64), dim=-1)  # L=4 patches, C=3
    got = msm(features, fraction, chunk_elements=chunk)
    assert got.shape == (n, 4) and got.dtype == torch.float32
    assert (got.double() - naive_msm(features, fraction)).abs().max() < 1e-6


def test_msm_chunked_equals_unchunked():
    """To float rounding: chunks of other shapes make matrix products of other shapes."""
    features = F.normalize(torch.randn(9, 16, 8, generator=torch.Generator().manual_seed(3)),
                           dim=-1)
    whole = msm(features, 0.3)
    for chunk in (1, 5, 16, 100, 16 * 16 * 3):
        assert torch.allclose(msm(features, 0.3, chunk_elements=chunk), whole, rtol=0, atol=1e-6)


def test_msm_with_ties():
    """Images 0 and 1 the same, and patch 0 the same in every image: distances of exactly 0, and
    equal distances competing for the k smallest."""
    g = torch.Generator().manual_seed(4)
    features = F.normalize(torch.randn(6, 4, 3, generator=g, dtype=torch.float64), dim=-1)
    features[1] = features[0]
    features[:, 0] = features[0, 0]
    got = msm(features, 0.5)
    assert (got.double() - naive_msm(features, 0.5)).abs().max() < 1e-6
    assert got[:, 0].abs().max() == 0  # the shared patch: every nearest distance is exactly 0


def test_msm_of_an_odd_patch():
    """Identical images but one patch of image 0: only that patch scores, the Euclidean distance
    (not 1 - cos) to the normal patches."""
    base = F.normalize(torch.randn(1, 9, 8, generator=torch.Generator().manual_seed(1)),
                       dim=-1).repeat(5, 1, 1)  # [5, 9, 8]
    base[0, 4] = F.normalize(torch.randn(8, generator=torch.Generator().manual_seed(2)), dim=0)
    score = msm(base, 0.3)  # N = 5: k = floor(0.3 * 4) = 1
    d = float((base[0, 4] - base[1]).norm(dim=-1).min())
    assert abs(float(score[0, 4]) - d) < 1e-5 and d > 0.3
    others = torch.ones_like(score, dtype=torch.bool)
    others[0, 4] = False
    assert score[others].abs().max() < 1e-3  # sqrt of float32 rounding at cos = 1


@pytest.mark.parametrize("n, fraction, needed", [(4, 0.3, 5), (2, 0.3, 5), (10, 0.1, 11),
                                                 (1, 1.0, 2), (3, 0.4, 4)])
def test_msm_with_too_few_images_says_how_many_are_needed(n, fraction, needed):
    with pytest.raises(ValueError, match=f"needs at least {needed} images .* got {n}"):
        msm(F.normalize(torch.randn(n, 4, 3), dim=-1), fraction)
    msm(F.normalize(torch.randn(needed, 4, 3), dim=-1), fraction)  # enough


@pytest.mark.parametrize("fraction", [0.3, 0.1, 1.0, 0.4, 0.5, 0.25, 0.2, 0.7, 0.05])
def test_msm_min_images_is_the_smallest_n_with_k_at_least_1(fraction):
    n = next(n for n in range(2, 100) if int(fraction * (n - 1)) >= 1)
    assert msm_min_images(fraction) == n


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_msm_rejects_a_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match="fraction"):
        msm(F.normalize(torch.randn(6, 4, 3), dim=-1), fraction)


# The patch score

def test_musc_scores_are_the_mean_over_layers_and_r_of_the_naive_loops():
    layers = [raw_tokens(5, 3, 4, seed=s) for s in range(2)]  # N=5, 3 x 3 patches, C=4
    want = sum(naive_msm(naive_lnamd(t, r), 0.3) for t in layers for r in (1, 3, 5)) / 6
    got = musc_scores(iter(layers))  # any iterable; r (1, 3, 5) and fraction 0.3 by default
    assert got.shape == (5, 9) and got.dtype == torch.float32
    assert (got.double() - want).abs().max() < 1e-6
    one_r = musc_scores(layers, 0.5, r_list=[3], chunk_elements=7)
    want = sum(naive_msm(naive_lnamd(t, 3), 0.5) for t in layers) / 2
    assert (one_r.double() - want).abs().max() < 1e-6


def test_musc_scores_need_layers_and_r():
    with pytest.raises(ValueError, match="no tapped layers"):
        musc_scores([])
    with pytest.raises(ValueError, match="r_list is empty"):
        musc_scores([raw_tokens(5, 2, 3)], r_list=[])


# RsCIN

@pytest.mark.parametrize("k_list", [(1,), (2,), (1, 2, 3), (1, 8, 9), (9,)])
def test_rscin_equals_naive_loop(k_list):
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(9, generator=g, dtype=torch.float64) * 4 + 1
    embeddings = torch.randn(9, 6, generator=g, dtype=torch.float64) + 1  # mostly positive cosines
    got = rscin(scores, embeddings, k_list)
    assert got.shape == (9,) and got.dtype == torch.float32
    assert (got.double() - naive_rscin(scores, embeddings, k_list)).abs().max() < 1e-6


def test_rscin_at_k_1_returns_the_normalized_scores_even_with_a_duplicate_image():
    """Images 0 and 1 have the same embedding (a tie at cosine 1): each keeps itself at k = 1, and
    at k = 2 both keep the pair."""
    g = torch.Generator().manual_seed(6)
    scores = torch.tensor([0.2, 0.9, 0.4, 0.6, 0.5])
    embeddings = torch.randn(5, 4, generator=g)
    embeddings[1] = embeddings[0]
    s = (scores - scores.min()) / (scores.max() - scores.min())
    assert torch.equal(rscin(scores, embeddings, [1]), s)
    pair = rscin(scores, embeddings, [2])[:2]
    assert torch.allclose(pair, (s[0] + s[1]).expand(2) / 2, atol=1e-6)
    assert (rscin(scores, embeddings, [1, 2, 3]).double()
            - naive_rscin(scores.double(), embeddings.double(), [1, 2, 3])).abs().max() < 1e-6


def test_rscin_of_equal_scores_is_zero():
    assert torch.equal(rscin(torch.full((4,), 0.7), torch.randn(4, 3), [1, 2]), torch.zeros(4))


@pytest.mark.parametrize("k_list", [[], [0], [1, 5]])
def test_rscin_rejects_k_outside_1_to_n(k_list):
    with pytest.raises(ValueError, match=r"1\.\.4"):
        rscin(torch.rand(4), torch.randn(4, 3), k_list)


# What the model hands MuSc

def test_raw_tokens_and_image_features_are_the_backbones(tiny_archive, tiny_vcp_cfg):
    torch.manual_seed(0)
    model = VCPCLIP(load_clip(tiny_archive, 56), tiny_vcp_cfg).eval()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        maps = model(images)
        image_features, layers = model.clip.encode_image(images, tiny_vcp_cfg.features_list)
    assert torch.equal(maps.image_features, image_features)  # [B, E]
    assert len(maps.raw_tokens) == len(layers)
    for raw, layer, patches in zip(maps.raw_tokens, layers, maps.patch_tokens):
        assert torch.equal(raw, layer)  # [B, 1+L, W], class token first
        assert torch.equal(patches, F.normalize(raw[:, 1:], dim=-1))
