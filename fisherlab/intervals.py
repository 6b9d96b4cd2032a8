"""Confidence intervals over independent samples (batches, Monte-Carlo draws, seeds).

One batch is one sample: a number measured on a mini-batch varies from batch to batch. fisherlab
reports every such number as a mean with a two-sided Student-t interval over its samples,
``mean ± t_{1−α/2, n−1} · s/√n`` (s the sample standard deviation), which covers the true mean
with probability ``level`` for normally distributed samples and approximately so otherwise
(tests/test_intervals.py measures the coverage of a seeded simulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

__all__ = ["Interval", "mean_interval", "LEVEL"]

LEVEL = 0.95
"""The default confidence level."""


@dataclass(frozen=True)
class Interval:
    """``mean ± half_width`` over ``n`` finite samples (half_width NaN when n < 2)."""

    mean: float
    half_width: float
    n: int
    level: float = LEVEL

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, spec: str = ".3e") -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "n/a"
        if self.n < 2 or math.isnan(self.half_width):
            return format(self.mean, spec)
        return f"{format(self.mean, spec)} ± {format(self.half_width, spec.replace('+', ''))}"


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The Student-t interval of the mean of the finite ``values`` (NaNs are left out)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, 0, level)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, 1, level)
    hw = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, hw, n, level)
