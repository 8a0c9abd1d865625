"""model/losses.py against a plain-loop oracle, a hand-worked example and gradcheck
(docs/reproduction.md §7)."""

import math

import numpy as np
import pytest
import torch

from model.losses import dice_loss, focal_loss, segmentation_loss


# ---------------------------------------------------------------- independent oracles (numpy loops)

def focal_oracle(probs: np.ndarray, target: np.ndarray) -> float:
    """probs [B,C,H,W], target [B,H,W] ints; docs/reproduction.md §7 focal loss written pixel by
    pixel."""
    b, c, h, w = probs.shape
    lo, hi = 1e-5 / (c - 1), 1 - 1e-5
    total, count = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                pt = 1e-5
                for k in range(c):
                    onehot = 1.0 if target[i, y, x] == k else 0.0
                    onehot = min(max(onehot, lo), hi)
                    pt += onehot * probs[i, k, y, x]
                total += -((1 - pt) ** 2) * math.log(pt)
                count += 1
    return total / count


def dice_oracle(prob: np.ndarray, target: np.ndarray) -> float:
    """prob, target [B,H,W]; 1 - batch mean of (2 sum pg + 1) / (sum p + sum g + 1)."""
    scores = []
    for i in range(prob.shape[0]):
        inter = sp = sg = 0.0
        for y in range(prob.shape[1]):
            for x in range(prob.shape[2]):
                inter += prob[i, y, x] * target[i, y, x]
                sp += prob[i, y, x]
                sg += target[i, y, x]
        scores.append((2 * inter + 1) / (sp + sg + 1))
    return 1 - sum(scores) / len(scores)


# ------------------------------------------------------------------------- the worked 1x2x2x2 case

# Channel 1 (abnormal) probabilities and the mask:
#   p1 = [[0.9, 0.2],      g = [[1, 0],
#         [0.6, 0.5]]           [0, 1]]
# With the one-hot clamped to [1e-5, 1-1e-5], pt = p_true*(1-1e-5) + p_other*1e-5 + 1e-5
#                                                = p_true + 2e-5 * (1 - p_true):
#   (0,0) true 0.9 -> pt 0.900002 -> -(0.099998)^2 ln 0.900002 = 0.00105354
#   (0,1) true 0.8 -> pt 0.800004 -> -(0.199996)^2 ln 0.800004 = 0.00892519
#   (1,0) true 0.4 -> pt 0.400012 -> -(0.599988)^2 ln 0.400012 = 0.32984067
#   (1,1) true 0.5 -> pt 0.500010 -> -(0.499990)^2 ln 0.500010 = 0.17327486
#   focal = mean = 0.12827356
# Dice: sum pg = 0.9 + 0.5 = 1.4, sum p = 2.2, sum g = 2 -> (2.8 + 1) / (2.2 + 2 + 1) = 3.8 / 5.2
#   dice loss = 1 - 0.73076923 = 0.26923077
P1 = np.array([[0.9, 0.2], [0.6, 0.5]])
G = np.array([[1, 0], [0, 1]])
FOCAL_HAND = 0.12827356485700517
DICE_HAND = 1 - 3.8 / 5.2


def _worked_tensors(dtype=torch.float64):
    probs = torch.tensor(np.stack([1 - P1, P1])[None], dtype=dtype)  # [1,2,2,2]
    target = torch.tensor(G[None, None], dtype=dtype)  # [1,1,2,2]
    return probs, target


def test_focal_worked_example():
    probs, target = _worked_tensors()
    got = focal_loss(probs, target).item()
    assert got == pytest.approx(FOCAL_HAND, abs=1e-12)
    assert got == pytest.approx(focal_oracle(probs.numpy(), G[None]), abs=1e-12)


def test_dice_worked_example():
    probs, target = _worked_tensors()
    got = dice_loss(probs[:, 1], target[:, 0]).item()
    assert got == pytest.approx(DICE_HAND, abs=1e-12)
    assert got == pytest.approx(dice_oracle(P1[None], G[None]), abs=1e-12)


def test_segmentation_loss_sums_focal_and_dice_over_maps():
    probs, target = _worked_tensors()
    once = segmentation_loss([probs], target).item()
    assert once == pytest.approx(FOCAL_HAND + DICE_HAND, abs=1e-12)
    # Two maps: the sum of their terms; [B,1,H,W] and [B,H,W] targets agree.
    other = torch.flip(probs, dims=[-1])
    twice = segmentation_loss([probs, other], target[:, 0]).item()
    expected = once + focal_loss(other, target).item() + dice_loss(other[:, 1], target[:, 0]).item()
    assert twice == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_random_batches_match_oracle(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 4, 5, generator=gen)
    probs = logits.softmax(dim=1).to(dtype)
    target = (torch.rand(3, 1, 4, 5, generator=gen) > 0.6).to(dtype)
    target[1] = 0  # one all-normal sample (the Dice smoothing term keeps it finite)
    p_np, g_np = probs.double().numpy(), target[:, 0].double().numpy()
    assert focal_loss(probs, target).item() == pytest.approx(focal_oracle(p_np, g_np.astype(int)),
                                                             abs=tol)
    assert dice_loss(probs[:, 1], target[:, 0]).item() == pytest.approx(
        dice_oracle(p_np[:, 1], g_np), abs=tol)


def test_focal_three_classes_matches_oracle():
    gen = torch.Generator().manual_seed(1)
    probs = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64).softmax(dim=1)
    target = torch.randint(0, 3, (2, 3, 3), generator=gen)
    assert focal_loss(probs, target).item() == pytest.approx(
        focal_oracle(probs.numpy(), target.numpy()), abs=1e-12)


def test_half_input_is_upcast():
    probs, target = _worked_tensors(torch.float16)
    out = focal_loss(probs, target)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(FOCAL_HAND, abs=2e-3)


def test_perfect_prediction_gives_near_zero_loss():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    probs = torch.cat([1 - target, target], dim=1)
    assert abs(focal_loss(probs, target).item()) < 1e-9
    assert dice_loss(probs[:, 1], target[:, 0]).item() == pytest.approx(0.0, abs=1e-7)


def test_shape_errors():
    probs, target = _worked_tensors()
    with pytest.raises(ValueError, match="target"):
        focal_loss(probs, target[:, :, :1])
    with pytest.raises(ValueError, match="must match"):
        dice_loss(probs[:, 1], target[:, 0, :1])
    with pytest.raises(ValueError):
        segmentation_loss([], target)


# ---------------------------------------------------------------------------- gradient sanity

def test_gradcheck_focal_and_dice():
    gen = torch.Generator().manual_seed(2)
    # Probabilities strictly inside (0, 1) so finite differences stay in the domain of log.
    probs = (0.1 + 0.8 * torch.rand(1, 2, 2, 3, generator=gen, dtype=torch.float64))
    probs.requires_grad_(True)
    target = (torch.rand(1, 1, 2, 3, generator=gen) > 0.5).double()
    assert torch.autograd.gradcheck(lambda p: focal_loss(p, target), (probs,))
    prob1 = probs.detach()[:, 1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: dice_loss(p, target[:, 0]), (prob1,))


def test_gradcheck_segmentation_loss_through_softmax():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)

    def loss_fn(z):
        p = z.softmax(dim=1)
        return segmentation_loss([p, p.flip(-1)], target)

    assert torch.autograd.gradcheck(loss_fn, (logits,))
    # The gradient pushes the abnormal logit up where the mask is 1, down elsewhere.
    segmentation_loss([logits.softmax(dim=1)], target).backward()
    g = logits.grad
    assert (g[:, 1][target == 1] < 0).all() and (g[:, 1][target == 0] > 0).all()
