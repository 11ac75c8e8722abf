"""Seed statistics: mean with a Student-t confidence interval, Welch's t-test, Holm's correction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["Summary", "holm", "summarize", "welch_p"]


@dataclass(frozen=True)
class Summary:
    """The mean of a metric over seeds and its confidence interval.

    Args:
        n: number of finite values.
        mean: their mean (NaN when ``n == 0``).
        std: sample standard deviation (ddof 1; NaN when ``n < 2``).
        ci_low: lower end of the interval (NaN when ``n < 2``).
        ci_high: upper end of the interval (NaN when ``n < 2``).
    """

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    @property
    def has_interval(self) -> bool:
        """Whether an interval exists (two or more values)."""
        return self.n >= 2


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean and two-sided Student-t interval ``mean ± t_{(1+c)/2, n-1} · s / sqrt(n)``.

    Args:
        values: one value per seed; NaNs are dropped.
        confidence: the interval's coverage (default 0.95).
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test between ``a`` and ``b``.

    Returns None when either side has fewer than two values, or when neither side
    varies (the statistic's denominator is zero and the test is undefined).
    """
    a = [v for v in a if math.isfinite(v)]
    b = [v for v in b if math.isfinite(v)]
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return None
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (the family-wise error rate).

    The i-th smallest of the m defined p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``;
    rejecting where the adjusted value is below alpha keeps the chance of any false
    rejection among the m tests below alpha. Undefined p-values (None) stay None and do
    not count in m.
    """
    defined = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(defined)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
