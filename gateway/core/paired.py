"""Paired statistics for shadows (DESIGN 6): running moments, the paired t-test, signed ranks.

Each mirrored request gives a difference d = m(shadow) - m(primary). This module owns

- `RunningStats`, the differences kept as (n, mean, M2): updated one at a time with Welford's
  method and merged across replicas with Chan et al.'s formula, so the fleet-wide test equals
  the test on all pairs;
- `paired_ttest`, Student's paired t-test from those moments (it equals `scipy.stats.ttest_rel`);
- `wilcoxon_test`, the Wilcoxon signed-rank test on the differences the store keeps (its
  capped pairs stream): latency differences are rarely normal, and ranks need the values
  themselves, which cannot be kept for every pair.

`paired_ttest` is valid at a fixed n, read once; a p-value watched continuously is the
always-valid one (`gateway.core.msprt`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Self

MIN_WILCOXON_PAIRS = 10
"""Fewer nonzero differences than this give no signed-rank result: the test has no power."""


@dataclass(frozen=True, slots=True)
class RunningStats:
    """Count, mean and sum of squared deviations (M2) of a stream of numbers."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def __post_init__(self) -> None:
        # These also arrive from the store; a bad triple would poison every later merge.
        if self.n < 0 or not self.m2 >= 0.0 or not math.isfinite(self.mean + self.m2):
            raise ValueError(f"need n >= 0, finite mean and finite m2 >= 0, got {self!r}")

    @classmethod
    def of(cls, values: Iterable[float]) -> Self:
        """The stats of `values`, added one by one."""
        stats = cls()
        for x in values:
            stats = stats.add(x)
        return stats

    def add(self, x: float) -> Self:
        """The stats with `x` added (Welford's update, stable without a second pass)."""
        if not math.isfinite(x):
            # One NaN would make every later mean NaN, fleet-wide once merged: refuse it here.
            raise ValueError(f"a difference must be a finite number, got {x!r}")
        n = self.n + 1
        delta = x - self.mean
        mean = self.mean + delta / n
        return type(self)(n, mean, self.m2 + delta * (x - mean))

    def merge(self, other: RunningStats) -> Self:
        """The stats of both streams together (Chan, Golub and LeVeque's pairwise formula)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return type(self)(other.n, other.mean, other.m2)
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.n * other.n / n)
        return type(self)(n, mean, m2)

    @property
    def variance(self) -> float | None:
        """The sample variance (n - 1 denominator), or None below two values."""
        return self.m2 / (self.n - 1) if self.n >= 2 else None


@dataclass(frozen=True, slots=True)
class PairedTest:
    """Student's paired t-test of mean difference 0 (two-sided), with a 95 % interval."""

    n: int
    mean_diff: float
    sd: float
    t: float
    df: int
    p: float
    ci95: tuple[float, float]

    def as_dict(self) -> dict[str, object]:
        """The fields of the status document's `shadows` entries (DESIGN 8)."""
        return {
            "n": self.n,
            "mean_diff": self.mean_diff,
            "t": self.t,
            "df": self.df,
            "p": self.p,
            "ci95": list(self.ci95),
        }


def paired_ttest(stats: RunningStats) -> PairedTest | None:
    """The paired t-test on the differences summarised by `stats`.

    t = mean / (sd / sqrt(n)), df = n - 1, p = 2 P(T_df > |t|), 95 % CI mean +- t_{0.975,df} se.
    None when n < 2 or sd is 0 (or not finite): the test is undefined there, and the status
    document shows null rather than a NaN.
    """
    variance = stats.variance
    if variance is None or not (variance > 0.0 and math.isfinite(variance)):
        return None
    df = stats.n - 1
    sd = math.sqrt(variance)
    se = sd / math.sqrt(stats.n)
    t = stats.mean / se
    # The same special functions scipy.stats.t uses, without its per-call overhead; imported
    # here because scipy costs a second at start-up and most processes never test anything.
    from scipy.special import stdtr, stdtrit

    p = 2.0 * float(stdtr(df, -abs(t)))
    half_width = float(stdtrit(df, 0.975)) * se
    ci95 = (stats.mean - half_width, stats.mean + half_width)
    return PairedTest(stats.n, stats.mean, sd, t, df, p, ci95)


@dataclass(frozen=True, slots=True)
class WilcoxonResult:
    """Wilcoxon signed-rank test (two-sided) on the differences the store keeps."""

    statistic: float
    p: float
    n: int  # nonzero differences ranked; zeros are dropped (Wilcoxon's convention)
    pairs: int  # differences the test was given, zeros included

    def as_dict(self) -> dict[str, object]:
        """The fields for the status document (nest them under a key naming the test)."""
        return {"pairs": self.pairs, "n": self.n, "statistic": self.statistic, "p": self.p}


PERMUTATION_MAX_N = 13
"""scipy's `auto` method runs an exact permutation test up to this many values with ties or
zeros (2^13 sign patterns)."""


def wilcoxon_test(diffs: Sequence[float]) -> WilcoxonResult | None:
    """The signed-rank test of median difference 0 on `diffs`, equal to
    `scipy.stats.wilcoxon(diffs)` (two-sided, zeros dropped, no continuity correction, method
    `auto`). None below `MIN_WILCOXON_PAIRS` nonzero values.

    With ties or zeros in at most `PERMUTATION_MAX_N` values scipy enumerates every sign
    pattern with `scipy.stats.permutation_test`, ranking each one again; the same test is run
    here with a vectorized statistic (the ranks of |d| do not change when signs flip), so the
    p-value is scipy's without seconds of CPU on the event loop.
    """
    if not all(math.isfinite(d) for d in diffs):
        raise ValueError("differences must be finite numbers")
    nonzero = sum(1 for d in diffs if d != 0)
    if nonzero < MIN_WILCOXON_PAIRS:
        return None
    ties_or_zeros = nonzero < len(diffs) or len({abs(d) for d in diffs}) < len(diffs)
    # scipy.stats is slow to import (bench/RESULTS.md): only when asked
    from scipy.stats import wilcoxon

    result = wilcoxon(diffs, alternative="two-sided", method="asymptotic")
    statistic = float(result.statistic)
    if len(diffs) > 50:
        p = float(result.pvalue)
    elif not ties_or_zeros:
        p = float(wilcoxon(diffs, alternative="two-sided", method="exact").pvalue)
    elif len(diffs) <= PERMUTATION_MAX_N:
        p = _signed_rank_permutation_p(diffs)
    else:
        p = float(result.pvalue)
    return WilcoxonResult(statistic, p, nonzero, len(diffs))


def _signed_rank_permutation_p(diffs: Sequence[float]) -> float:
    """scipy's exact permutation p-value for the signed-rank sum (`auto` with ties or zeros)."""
    import numpy as np
    from scipy.stats import permutation_test, rankdata

    d = np.asarray(diffs, dtype=float)
    kept = d != 0  # zeros stay zeros under a sign flip and carry no rank ('wilcox')
    ranks = np.zeros_like(d)
    ranks[kept] = rankdata(np.abs(d[kept]))

    def r_plus(x: Any, axis: int = -1) -> Any:
        return np.sum((x > 0) * ranks, axis=axis)

    result = permutation_test(
        (d,),
        r_plus,
        permutation_type="samples",
        vectorized=True,
        n_resamples=9999,
        alternative="two-sided",
        axis=-1,
    )
    return float(result.pvalue)
