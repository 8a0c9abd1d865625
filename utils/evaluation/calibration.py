"""Choosing the deployment threshold T from normal images (ours; ``predict.py --calibrate`` and the
inspection page both use it).

An image raises an alarm at T when some pixel of its map is above T (its mask is not empty), that
is when its max pixel score is > T. For a false-alarm rate ``a`` (0 <= a < 1) and the max pixel
scores ``s_1 <= ... <= s_n`` of n normal images, T is the empirical (1 - a) quantile

    T = s_k,  k = ceil((1 - a) * n) = n - floor(a * n),

the *inverted CDF* quantile (Hyndman & Fan's definition 1, ``numpy.quantile(s, 1 - a,
method="inverted_cdf")``): the smallest normal score with at least (1 - a) * n normal scores at or
below it. So at most floor(a * n) of the normal images raise an alarm at T, and T is one of the
scores seen, never an interpolation. With fewer than 1 / a normal images floor(a * n) is 0 and
T is their largest score: the rate asked for cannot be told apart from 0 on so few images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ROUNDING", "threshold_for", "alarm_rate", "Calibration", "calibrate"]

# a * n is rounded to this many decimals before the floor, so that 0.29 * 100 (28.999999999999996
# in binary floating point) allows 29 alarms, as the decimal rate means
ROUNDING = 9


def _scores(scores, what: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size and not np.isfinite(s).all():
        raise ValueError(f"{what}: scores must be finite numbers")
    return s


def threshold_for(normal_scores, false_alarm_rate: float) -> float:
    """T: the inverted-CDF (1 - ``false_alarm_rate``) quantile of the normal max pixel scores.

    Args:
        normal_scores: max pixel score of each normal image, ``[n]``, n >= 1.
        false_alarm_rate: ``a`` in [0, 1), the share of normal images allowed above T.

    Returns:
        ``s_k`` with ``k = n - floor(a * n)`` (1-based, scores sorted ascending).
    """
    s = np.sort(_scores(normal_scores, "normal images"))
    if s.size == 0:
        raise ValueError("no normal images to calibrate on")
    if not 0.0 <= false_alarm_rate < 1.0:
        raise ValueError(f"false-alarm rate must be in [0, 1), got {false_alarm_rate}")
    allowed = math.floor(round(false_alarm_rate * s.size, ROUNDING))  # alarms allowed, < n
    return float(s[s.size - 1 - allowed])


def alarm_rate(scores, threshold: float) -> float:
    """Share of the images whose max pixel score is > ``threshold`` (nan for no images)."""
    s = _scores(scores, "images")
    return float((s > threshold).mean()) if s.size else math.nan


@dataclass
class Calibration:
    """T for a false-alarm rate, with what it does on the images it was chosen on."""

    threshold: float
    false_alarm_rate: float  # the rate asked for
    normal_scores: list[float]  # max pixel score of each normal image
    defective_scores: list[float] = field(default_factory=list)

    @property
    def normal_alarm_rate(self) -> float:
        """Share of the calibration's normal images above T (<= the rate asked for)."""
        return alarm_rate(self.normal_scores, self.threshold)

    @property
    def recall(self) -> float:
        """Share of the defective images above T (nan without defective images)."""
        return alarm_rate(self.defective_scores, self.threshold)

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "false_alarm_rate": self.false_alarm_rate,
                "normal_alarm_rate": self.normal_alarm_rate,
                "recall": None if math.isnan(self.recall) else self.recall,
                "normal_scores": self.normal_scores, "defective_scores": self.defective_scores}


def calibrate(normal_scores, false_alarm_rate: float, defective_scores=()) -> Calibration:
    """T for ``false_alarm_rate`` from normal max pixel scores (``threshold_for``), with the
    recall on the defective images' max pixel scores when there are some."""
    return Calibration(threshold_for(normal_scores, false_alarm_rate), false_alarm_rate,
                       [float(x) for x in _scores(normal_scores, "normal images")],
                       [float(x) for x in _scores(defective_scores, "defective images")])
