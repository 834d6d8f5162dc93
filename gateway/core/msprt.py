"""Always-valid inference on a mean difference (DESIGN 6): the normal-mixture SPRT and Holm.

People read the shadow comparison at any time, as often as they like. A fixed-n p-value read
at every look rejects a true null far more often than it says; the mixture sequential
probability ratio test (mSPRT; Robbins 1970, Johari, Pekelis and Walsh 2017) does not. With
the differences' mean `x`, their variance `s2` (the sample variance, plugged in) and a normal
mixing distribution N(0, tau^2) over the true mean under the alternative,

    Lambda_n(theta) = sqrt(s2 / (s2 + n tau^2))
                      * exp(n^2 tau^2 (x - theta)^2 / (2 s2 (s2 + n tau^2)))

is (with s2 known) a nonnegative martingale under mean theta, so by Ville's inequality it
ever exceeds 1/alpha with probability at most alpha. Hence

- the always-valid p-value `min over looks of min(1, 1 / Lambda_n(0))`, valid whenever it is
  read and however often: the caller keeps the running minimum;
- the confidence sequence `{theta : Lambda_n(theta) < 1 / alpha}`, a closed-form interval
  around x that covers the true mean at every n at once with probability >= 1 - alpha.

tau is the smallest mean difference worth finding (`shadows[].mde`); without one the caller
freezes the sample sd at `DEFAULT_TAU_AT_N` pairs. Everything here is computed from
(n, mean, M2) alone, so fleet-wide values follow from the merged running stats.

Holm's step-down procedure turns the p-values of all of a flag's comparisons into decisions
whose family-wise error rate is at most alpha.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.core.paired import RunningStats

DEFAULT_TAU_AT_N = 100
"""Without an `mde`, tau is the sample sd of the differences at the first n >= this, frozen."""

CS_ALPHA = 0.05  # the confidence sequence is a 95 % one


@dataclass(frozen=True, slots=True)
class AlwaysValid:
    """One look's mSPRT: the p-value at this look (not yet the running minimum) and the CS."""

    p: float
    cs95: tuple[float, float]


def default_tau(stats: RunningStats) -> float | None:
    """The default mixing sd for these stats: their sample sd once n >= `DEFAULT_TAU_AT_N`
    (and the sd is positive), else None (not yet known)."""
    variance = stats.variance
    if stats.n < DEFAULT_TAU_AT_N or variance is None or not variance > 0.0:
        return None
    return math.sqrt(variance)


def always_valid(stats: RunningStats, tau: float) -> AlwaysValid | None:
    """The mSPRT of mean 0 at this look, with the sample variance plugged in.

    None when n < 2, the sample variance is 0 or tau is not a positive finite number: the
    statistic is undefined there (the status shows null).
    """
    variance = stats.variance
    if variance is None or not (variance > 0.0 and math.isfinite(variance)):
        return None
    if not (tau > 0.0 and math.isfinite(tau)):
        return None
    n, mean = stats.n, stats.mean
    tau2 = tau * tau
    spread = variance + n * tau2  # s2 + n tau^2
    scale = 2.0 * variance * spread / (n * n * tau2)  # (x - theta)^2 / scale is the exponent
    log_shrink = 0.5 * math.log(spread / variance)  # -log of the sqrt factor, >= 0
    log_lambda = mean * mean / scale - log_shrink
    p = 1.0 if log_lambda <= 0.0 else math.exp(-log_lambda)
    half_width = math.sqrt(scale * (math.log(1.0 / CS_ALPHA) + log_shrink))
    return AlwaysValid(p, (mean - half_width, mean + half_width))


def holm(pvalues: Sequence[float | None], alpha: float) -> list[bool]:
    """Holm's step-down rejections at family-wise level `alpha`; a None (no test) is never
    rejected and does not count towards the family size.

    The k-th smallest of m p-values is rejected iff it and every smaller one satisfy
    p_(j) <= alpha / (m - j + 1).
    """
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    rejected = [False] * len(pvalues)
    m = len(tested)
    for rank, (p, i) in enumerate(tested):
        if p > alpha / (m - rank):
            break
        rejected[i] = True
    return rejected
