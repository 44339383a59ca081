"""The statistics of a few-shot comparison (docs/architecture.md, "Evaluation protocol"), on scipy.

Means over E episodes get a 95% confidence interval with the t quantile (t_0.975,E-1 * s / sqrt(E):
2.262 at E = 10, 1.96 only as E grows large); two strategies run on the same episodes are compared
by their paired differences (a t interval and a two-sided t-test on the differences); the p-values
of one cell's strategies against its best are corrected together with Holm's step-down method
(Holm 1979, "A simple sequentially rejective multiple test procedure"). A difference whose interval
includes zero is a tie: the data cannot tell the two apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95


def t_quantile(n: int, level: float = LEVEL) -> float:
    """The two-sided t quantile for a mean of ``n`` values (``nan`` below 2)."""
    return float(stats.t.ppf(0.5 + level / 2, n - 1)) if n >= 2 else float("nan")


def ci_half_width(values: Sequence[float], level: float = LEVEL) -> float:
    """Half-width of the t confidence interval of the mean of ``values`` (``nan`` below 2 values)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float("nan")
    return t_quantile(len(v), level) * float(v.std(ddof=1)) / math.sqrt(len(v))


@dataclass(frozen=True)
class Paired:
    """Mean of the paired differences ``a - b`` over ``n`` shared episodes, its CI half-width and
    the two-sided p-value of a paired t-test (1.0 when every difference is zero)."""

    mean: float
    ci: float
    p_value: float
    n: int

    @property
    def tie(self) -> bool:
        """The interval includes zero (or there are too few episodes to have one)."""
        return not (self.n >= 2 and abs(self.mean) > self.ci)

    def equivalent(self, margin: float) -> bool:
        """Practically equivalent: the whole interval lies within ``± margin`` (two one-sided tests,
        Schuirmann 1987); never with fewer than two episodes."""
        return self.n >= 2 and bool(np.isfinite(self.ci)) and abs(self.mean) + self.ci <= margin


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Paired:
    """The paired comparison of two strategies' accuracies on the same episodes, in the same order."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    if n == 0:
        return Paired(float("nan"), float("nan"), float("nan"), 0)
    mean = float(d.mean())
    if n < 2:
        return Paired(mean, float("nan"), float("nan"), n)
    if not np.any(d != d[0]):  # no spread: the differences are all equal
        return Paired(mean, 0.0, 1.0 if mean == 0 else 0.0, n)
    p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return Paired(mean, ci_half_width(d, level), p, n)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the given order (``nan`` stays ``nan`` and does not count)."""
    p = np.asarray(p_values, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), np.nan)
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
