"""The guard's statistics (DESIGN 5): Wald's Bernoulli SPRT on canary errors, alpha spent
over the whole rollout.

This module owns the bounds (`SprtBounds`), the counts (`SprtCounts`), one step of the test
(`step`), relative mode's per-error increment (`relative_increment`) and the figures used to
document it (`fixed_sample_size`, `expected_sample_number`). Each canary response is one
Bernoulli observation (1 = error). With n responses and k errors since test i started

    llr(n, k) = k ln(e1/e0) + (n - k) ln((1 - e1)/(1 - e0))
    A_i = ln(i (i + 1)/alpha)        B = ln(beta/(1 - alpha))

`llr >= A_i` rejects H0 (roll back), `llr <= B` accepts H0 (the step is healthy; test i + 1
starts at zero so monitoring goes on), anything between continues. exp(llr) is a nonnegative
supermartingale under any e <= e0, so by Ville's inequality test i rolls back a healthy canary
with probability at most alpha/(i (i + 1)); these sum to alpha over all tests, so alpha bounds
the whole rollout however many tests it runs. State is the pair (n, k) and the test index, so
replicas can add their deltas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum


def rejection_bound(alpha: float, test: int) -> float:
    """A_i = ln(i (i + 1)/alpha), the rejection bound of test i (i = 1, 2, ...) of a rollout.

    Test i may spend alpha/(i (i + 1)) of the rollout's alpha; the sum over i is alpha.
    """
    if test < 1:
        raise ValueError(f"tests are numbered from 1, got {test!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"need 0 < alpha < 1, got {alpha!r}")
    return math.log(test * (test + 1) / alpha)


def alpha_spent(alpha: float, test: int) -> float:
    """alpha (1 - 1/(i + 1)): the most tests 1 .. i together may have spent."""
    return alpha * (1.0 - 1.0 / (test + 1))


def wald_rejection_bound(alpha: float, beta: float) -> float:
    """Wald's single-test bound ln((1 - beta)/alpha), for comparison and ASN figures only.

    A guard that restarts after every acceptance and judges every test against this one bound
    rolls back a healthy canary with a probability that grows with its traffic towards 1.
    """
    return math.log((1 - beta) / alpha)


class Decision(StrEnum):
    """What the test says after an observation.

    A `StrEnum` (a `str` and an `Enum`): its members are their values, so they go into the
    status JSON and metric labels as `"continue"`, `"accept"`, `"reject"` without conversion.
    """

    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class SprtBounds:
    """The hypotheses H0: e = e0 and H1: e = e1 with error probabilities alpha and beta.

    alpha = P(reject | e = e0) (a needless rollback), beta = P(accept | e = e1) (a missed one).
    """

    e0: float
    e1: float
    alpha: float
    beta: float
    # Derived once: `llr` runs on every canary response, so it must be two multiplications.
    log_error_ratio: float = field(init=False, repr=False, compare=False)
    log_success_ratio: float = field(init=False, repr=False, compare=False)
    _lower: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.e0 < self.e1 < 1.0:
            raise ValueError(f"need 0 < e0 < e1 < 1, got e0={self.e0!r}, e1={self.e1!r}")
        if not (self.alpha > 0.0 and self.beta > 0.0):
            raise ValueError(f"need alpha > 0 and beta > 0, got {self.alpha!r}, {self.beta!r}")
        if not self.alpha + self.beta < 1.0:
            raise ValueError(f"need alpha + beta < 1, got {self.alpha!r} + {self.beta!r}")
        # The class is frozen; __post_init__ is the one place allowed to fill derived fields.
        object.__setattr__(self, "log_error_ratio", math.log(self.e1 / self.e0))
        object.__setattr__(self, "log_success_ratio", math.log((1 - self.e1) / (1 - self.e0)))
        object.__setattr__(self, "_lower", math.log(self.beta / (1 - self.alpha)))

    @property
    def A(self) -> float:  # named as in DESIGN 5 and the status JSON
        """The first test's rejection bound A_1 = ln(2/alpha)."""
        return rejection_bound(self.alpha, 1)

    def a(self, test: int) -> float:
        """The rejection bound A_i of test i."""
        return rejection_bound(self.alpha, test)

    @property
    def B(self) -> float:  # named as in DESIGN 5 and the status JSON
        """The acceptance bound ln(beta/(1 - alpha))."""
        return self._lower

    def llr(self, n: int, k: int) -> float:
        """The log-likelihood ratio of H1 over H0 after n responses with k errors."""
        return k * self.log_error_ratio + (n - k) * self.log_success_ratio

    def decide(self, n: int, k: int, test: int = 1) -> Decision:
        """REJECT at or above A_test, ACCEPT at or below B, else CONTINUE."""
        llr = self.llr(n, k)
        if llr >= rejection_bound(self.alpha, test):
            return Decision.REJECT
        if llr <= self._lower:
            return Decision.ACCEPT
        return Decision.CONTINUE


def relative_increment(q: float, ratio: float, *, from_canary: bool) -> float:
    """Relative mode's llr increment for one error (DESIGN 5): ln(p1/q) or ln((1-p1)/(1-q)).

    q is the canary's share of the step's requests counted before this error, and
    p1 = ratio q/(ratio q + 1 - q) the chance the error is the canary's under H1 (the canary
    fails `ratio` times as often as stable). Written as ln(ratio) - ln(1 + (ratio - 1) q) and
    -ln(1 + (ratio - 1) q), which stay finite at q = 0 and q = 1.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q!r}")
    if not ratio > 1.0:
        raise ValueError(f"ratio must be > 1, got {ratio!r}")
    spread = math.log1p((ratio - 1.0) * q)
    return math.log(ratio) - spread if from_canary else -spread


@dataclass(frozen=True, slots=True)
class SprtCounts:
    """n responses seen by the test, k of them errors."""

    n: int = 0
    k: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.k <= self.n:
            raise ValueError(f"need 0 <= k <= n, got n={self.n!r}, k={self.k!r}")

    def observe(self, error: bool) -> SprtCounts:
        """The counts after one more response."""
        return SprtCounts(self.n + 1, self.k + 1 if error else self.k)

    def plus(self, other: SprtCounts) -> SprtCounts:
        """The sum of two counts, e.g. the global counts plus a replica's delta."""
        return SprtCounts(self.n + other.n, self.k + other.k)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision on `counts`, and the llr it was taken at (for the status and metrics)."""

    decision: Decision
    counts: SprtCounts
    llr: float


def evaluate(bounds: SprtBounds, counts: SprtCounts, test: int = 1) -> Verdict:
    """Judge `counts` of test `test` without observing anything new (e.g. global counts)."""
    llr = bounds.llr(counts.n, counts.k)
    return Verdict(bounds.decide(counts.n, counts.k, test), counts, llr)


def step(
    bounds: SprtBounds, counts: SprtCounts, error: bool, test: int = 1
) -> tuple[SprtCounts, Verdict]:
    """Add one response to test `test` and decide; returns the counts to keep and the verdict.

    On ACCEPT the kept counts restart at zero (monitoring goes on in test + 1; a later
    degradation must be caught from a fresh start) while the verdict carries the counts that
    accepted. On REJECT and CONTINUE the new counts are kept.
    """
    verdict = evaluate(bounds, counts.observe(error), test)
    if verdict.decision is Decision.ACCEPT:
        return SprtCounts(), verdict
    return verdict.counts, verdict


def fixed_sample_size(e0: float, e1: float, alpha: float, beta: float) -> int:
    """n of the one-sided fixed-sample test of e0 against e1 with the same alpha and beta.

    Uses the normal approximation to the binomial with each hypothesis' own variance:
    n = ((z_{1-alpha} sqrt(e0(1-e0)) + z_{1-beta} sqrt(e1(1-e1))) / (e1 - e0))^2, rounded up.
    """
    SprtBounds(e0=e0, e1=e1, alpha=alpha, beta=beta)  # the same validation, same messages
    from scipy.stats import norm  # heavy to import; these figures are for docs and tests

    z_alpha = float(norm.ppf(1 - alpha))
    z_beta = float(norm.ppf(1 - beta))
    spread = z_alpha * math.sqrt(e0 * (1 - e0)) + z_beta * math.sqrt(e1 * (1 - e1))
    return math.ceil((spread / (e1 - e0)) ** 2)


def expected_sample_number(bounds: SprtBounds, e: float, test: int = 1) -> float:
    """Wald's approximation of the mean number of responses to a decision of test `test` at
    error rate e.

    ASN(e) = (L(e) B + (1 - L(e)) A) / E[z], with z the llr increment of one response and
    L(e) = (exp(hA) - 1) / (exp(hA) - exp(hB)) the probability of accepting, where h != 0
    solves E[exp(h z)] = 1 (h = 1 at e0, h = -1 at e1). Overshoot of the bounds is ignored,
    so the true ASN is a little larger. At the rate where E[z] = 0 the limit -AB / E[z^2] holds.
    """
    if not 0.0 <= e <= 1.0:
        raise ValueError(f"e must lie in [0, 1], got {e!r}")
    up, down = bounds.log_error_ratio, bounds.log_success_ratio
    a, b = bounds.a(test), bounds.B
    drift = e * up + (1 - e) * down
    second_moment = e * up * up + (1 - e) * down * down
    if abs(drift) <= 1e-9 * second_moment:
        return -a * b / second_moment
    if e in (0.0, 1.0):
        return (b if e == 0.0 else a) / drift
    accept = _accept_probability(_wald_h(e, up, down), a, b)
    return (accept * b + (1 - accept) * a) / drift


def _wald_h(e: float, up: float, down: float) -> float:
    """The nonzero root of g(h) = e exp(h up) + (1 - e) exp(h down) - 1."""

    def g(h: float) -> float:
        return e * math.exp(h * up) + (1 - e) * math.exp(h * down) - 1

    # g is convex with g(0) = 0; its minimum sits at h_min, strictly between 0 and the root,
    # so [h_min, far] brackets the root once `far` is pushed out past it.
    h_min = math.log(-(1 - e) * down / (e * up)) / (up - down)
    far = 2 * h_min
    while g(far) < 0:
        far *= 2
    lo, hi = sorted((h_min, far))
    from scipy.optimize import brentq

    return float(brentq(g, lo, hi, xtol=1e-14, rtol=1e-14))


def _accept_probability(h: float, a: float, b: float) -> float:
    """Wald's operating characteristic (exp(hA) - 1) / (exp(hA) - exp(hB)), kept finite."""
    if h > 0:  # divide through by exp(hA): every exponent below is <= 0
        return -math.expm1(-h * a) / -math.expm1(h * (b - a))
    # h < 0: multiply through by exp(-hB): every exponent below is <= 0
    return (math.exp(h * (a - b)) - math.exp(-h * b)) / math.expm1(h * (a - b))
