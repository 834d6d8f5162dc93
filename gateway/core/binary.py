"""Shadow metrics that are 0 or 1 per answer (DESIGN 6): agreement rates and McNemar's test.

`agreement` is one proportion: how often the shadow answered what the primary answered. It is
reported as a rate with Wilson's score interval, which stays inside [0, 1] and keeps its
coverage near 0 and 1 where a t-interval does neither.

`error` pairs are (primary failed, shadow failed) in {0, 1}^2; only the discordant ones say
which side fails more. McNemar's exact test is the binomial test of b (the shadow alone failed)
out of b + c discordant pairs against 1/2. b and c follow from the running (n, mean, M2) of
d = shadow - primary in {-1, 0, 1}: n mean = b - c and M2 + n mean^2 = sum d^2 = b + c, so the
fleet-wide counts come from the fleet-wide running stats without another counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.core.paired import RunningStats

Z_975 = 1.959963984540054  # the standard normal's 97.5 % quantile


@dataclass(frozen=True, slots=True)
class Rate:
    """k successes out of n, with Wilson's 95 % score interval."""

    k: int
    n: int
    rate: float
    wilson95: tuple[float, float]

    def as_dict(self) -> dict[str, object]:
        return {"k": self.k, "n": self.n, "rate": self.rate, "wilson95": list(self.wilson95)}


def wilson(k: int, n: int) -> Rate | None:
    """The rate k / n with Wilson's 95 % interval (within [0, 1]); None when n = 0."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z2 = Z_975 * Z_975
    centre = (k + z2 / 2.0) / (n + z2)
    half = Z_975 / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4.0)
    rate = k / n
    # exact at the edges (k = 0 or n), where the formula's rounding would leave ~1e-17
    low = 0.0 if k == 0 else min(rate, max(0.0, centre - half))
    high = 1.0 if k == n else max(rate, min(1.0, centre + half))
    return Rate(k, n, rate, (low, high))


def agreement_rate(stats: RunningStats) -> Rate | None:
    """The agreement rate from the running stats of d in {-1, 0} (-1 = the shadow disagreed)."""
    return wilson(round(stats.n * (1.0 + stats.mean)), stats.n)


@dataclass(frozen=True, slots=True)
class McNemar:
    """McNemar's exact test: b pairs where only the shadow failed, c where only the primary did."""

    b: int
    c: int
    p: float

    def as_dict(self) -> dict[str, object]:
        return {"shadow_only": self.b, "primary_only": self.c, "p": self.p}


def discordant(stats: RunningStats) -> tuple[int, int]:
    """(b, c) of error pairs from the running stats of d in {-1, 0, 1}."""
    diff = stats.n * stats.mean  # b - c
    both = stats.m2 + stats.n * stats.mean * stats.mean  # b + c
    b = round((both + diff) / 2.0)
    c = round((both - diff) / 2.0)
    return max(b, 0), max(c, 0)


def mcnemar(b: int, c: int) -> McNemar | None:
    """The exact two-sided test of b ~ Binomial(b + c, 1/2) (`scipy.stats.binomtest`); None
    without discordant pairs."""
    if b + c == 0:
        return None
    from scipy.stats import binomtest  # imported on demand: scipy.stats is slow to load

    return McNemar(b, c, float(binomtest(b, b + c, 0.5).pvalue))
