"""Threshold calibration: T against a brute-force oracle in exact arithmetic and numpy's quantile."""
import math
from fractions import Fraction

import numpy as np
import pytest

from utils.calibration import alarm_rate, calibrate, threshold_for


def oracle(scores, rate) -> float:
    """The smallest score t with #{s > t} <= rate * n, counted in exact decimal arithmetic."""
    allowed = Fraction(repr(rate)) * len(scores)
    return min(t for t in scores if sum(s > t for s in scores) <= allowed)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 37, 100, 1000])
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.07, 0.1, 0.29, 0.5, 0.9])
def test_threshold_is_the_exact_quantile(n, rate):
    rng = np.random.default_rng(n)
    scores = rng.gamma(2.0, 0.1, n).round(2)  # rounded: ties happen
    t = threshold_for(scores, rate)
    assert t == oracle(list(scores), rate)
    assert alarm_rate(scores, t) <= rate  # the guarantee on the calibration images
    assert t in scores


@pytest.mark.parametrize("rate", [0.0, 0.125, 0.25, 0.5, 0.75])  # (1 - rate) * n is exact
def test_same_as_numpys_inverted_cdf(rate):
    scores = np.random.default_rng(0).normal(size=24)
    assert threshold_for(scores, rate) == np.quantile(scores, 1 - rate, method="inverted_cdf")


def test_worked_example_and_report():
    normal = [0.30, 0.10, 0.20, 0.40, 0.90, 0.50, 0.60, 0.70, 0.80, 0.35]
    # 10 images at 10 %: one may alarm, so T is the 9th smallest, 0.8 (0.9 alone is above it)
    c = calibrate(normal, 0.1, defective_scores=[0.95, 0.85, 0.5, 0.81])
    assert c.threshold == 0.8 and c.normal_alarm_rate == 0.1 and c.recall == 0.75
    # below 1 / n the rate cannot be met but by the largest score
    assert threshold_for(normal, 0.05) == 0.9 and threshold_for(normal, 0.0) == 0.9
    assert math.isnan(calibrate(normal, 0.1).recall)
    assert calibrate(normal, 0.1).to_dict()["recall"] is None


@pytest.mark.parametrize("scores,rate,message", [
    ([], 0.01, "no normal images"), ([0.1, 0.2], 1.0, "in [0, 1)"),
    ([0.1, 0.2], -0.1, "in [0, 1)"), ([0.1, float("nan")], 0.1, "finite")])
def test_bad_input(scores, rate, message):
    with pytest.raises(ValueError) as e:
        threshold_for(scores, rate)
    assert message in str(e.value)
