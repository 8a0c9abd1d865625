"""Greedy coreset (model/coreset.py) against a plain O(M^2) farthest-point loop."""
import math

import pytest
import torch

from model.coreset import coreset_size, greedy_coreset
from model.patch_scoring import reference_score


def naive_coreset(features, m, seed=0, projection_dim=128):
    """Plain loops in float64: the projection drawn as documented (standard normal [C, D] from a
    CPU generator seeded with ``seed``, none when C <= D), the start farthest from the mean, then
    m - 1 times the untaken patch whose nearest taken patch is farthest; equal distances go to
    the lowest index."""
    x = features.double()
    if x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=torch.Generator().manual_seed(seed))
        x = x @ proj.double()
    points = [[float(v) for v in row] for row in x]
    mean = [sum(col) / len(points) for col in zip(*points)]
    taken = [max(range(len(points)), key=lambda i: (math.dist(points[i], mean), -i))]
    while len(taken) < m:
        def to_taken(i):
            return min(math.dist(points[i], points[j]) for j in taken)
        rest = [i for i in range(len(points)) if i not in taken]
        taken.append(max(rest, key=lambda i: (to_taken(i), -i)))
    return sorted(taken)


def memory(m, c, seed=0):
    return torch.randn(m, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m, c, ratio", [(40, 5, 0.1), (40, 5, 0.5), (30, 16, 0.9), (25, 3, 0.04)])
def test_greedy_coreset_equals_naive_loop_without_projection(m, c, ratio):
    features = memory(m, c, seed=m + c)
    got = greedy_coreset(features, ratio)
    assert got.dtype == torch.long and len(got) == coreset_size(m, ratio)
    assert got.tolist() == naive_coreset(features, coreset_size(m, ratio))


@pytest.mark.parametrize("c, projection_dim", [(200, 128), (12, 4)])
def test_greedy_coreset_equals_naive_loop_on_the_projection(c, projection_dim):
    features = memory(50, c, seed=c)
    got = greedy_coreset(features, 0.2, seed=3, projection_dim=projection_dim)
    assert got.tolist() == naive_coreset(features, 10, seed=3, projection_dim=projection_dim)


def test_greedy_coreset_with_ties_and_duplicates():
    """Small integers (exact float32 distances): 6 distinct rows, each 3 times; the 6 distinct
    ones come first (lowest index of each), then only duplicates are left."""
    distinct = torch.tensor([[0.0, 0], [4, 0], [0, 4], [4, 4], [2, 2], [9, 9]])
    features = distinct.repeat(3, 1)  # [18, 2]: row i is distinct[i % 6]
    six = greedy_coreset(features, 6 / 18)
    assert six.tolist() == naive_coreset(features, 6) == list(range(6))
    eight = greedy_coreset(features, 8 / 18)
    assert eight.tolist() == naive_coreset(features, 8)
    assert len(set(eight.tolist())) == 8  # never a patch twice


def test_greedy_coreset_at_ratio_1_is_every_index_and_the_full_memorys_scores():
    features = memory(30, 7)
    assert torch.equal(greedy_coreset(features, 1.0), torch.arange(30))
    bank = torch.nn.functional.normalize(features, dim=-1)
    query = torch.nn.functional.normalize(memory(2 * 9, 7, seed=1), dim=-1).view(2, 9, 7)
    full = reference_score([query], [bank])
    assert torch.equal(reference_score([query], [bank[greedy_coreset(bank, 1.0)]]), full)


def test_greedy_coreset_is_seeded():
    features = memory(60, 300)
    first = greedy_coreset(features, 0.1, seed=7)
    assert torch.equal(greedy_coreset(features, 0.1, seed=7), first)
    others = [greedy_coreset(features, 0.1, seed=s) for s in range(4)]
    assert any(not torch.equal(o, first) for o in others)  # the seed draws the projection


@pytest.mark.parametrize("m, ratio, size", [(10, 0.1, 1), (10, 0.01, 1), (1, 0.5, 1),
                                            (1000, 0.1, 100), (10, 0.25, 2), (10, 0.35, 4)])
def test_coreset_size_rounds_and_keeps_one(m, ratio, size):
    assert coreset_size(m, ratio) == size


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_coreset_rejects_a_ratio_outside_0_1(ratio):
    with pytest.raises(ValueError, match="ratio"):
        greedy_coreset(memory(10, 3), ratio)
