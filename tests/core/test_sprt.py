"""The guard's SPRT (DESIGN 5): known answers, properties, and its guarantees by simulation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from gateway.core.sprt import (
    Decision,
    SprtBounds,
    SprtCounts,
    alpha_spent,
    expected_sample_number,
    fixed_sample_size,
    rejection_bound,
    relative_increment,
    step,
    wald_rejection_bound,
)

DEFAULTS = SprtBounds(e0=0.01, e1=0.05, alpha=0.01, beta=0.10)

# Fixed seeds: the same examples on every run. No deadline: scipy's first calls (and a busy
# shared runner) exceed hypothesis' 200 ms, which measures nothing we promise.
FIXED = settings(derandomize=True, deadline=None)


def run(bounds: SprtBounds, errors: list[bool]) -> tuple[SprtCounts, list[Decision]]:
    """Feed `errors` through `step` from fresh counts, test 1 and on after each ACCEPT; the
    counts left and every decision."""
    counts, decisions, test = SprtCounts(), [], 1
    for error in errors:
        counts, verdict = step(bounds, counts, error, test)
        decisions.append(verdict.decision)
        test += verdict.decision is Decision.ACCEPT
    return counts, decisions


# --- known answers -----------------------------------------------------------------------


def test_default_bounds_are_the_documented_numbers() -> None:
    # DESIGN 5: A_1 = ln 200 = 5.2983, A_2 = ln 600 = 6.3969, B = -2.2925
    assert abs(DEFAULTS.A - math.log(200)) <= 1e-12
    assert abs(DEFAULTS.a(2) - math.log(600)) <= 1e-12
    assert abs(DEFAULTS.B - math.log(0.1 / 0.99)) <= 1e-12
    assert (round(DEFAULTS.A, 4), round(DEFAULTS.a(2), 4)) == (5.2983, 6.3969)
    assert round(DEFAULTS.B, 4) == -2.2925
    assert round(wald_rejection_bound(0.01, 0.10), 4) == 4.4998  # the old single bound, ln 90


def test_four_consecutive_errors_reject_tests_one_and_two_and_three_do_not() -> None:
    counts, decisions = run(DEFAULTS, [True] * 3)
    assert decisions == [Decision.CONTINUE] * 3
    assert DEFAULTS.llr(3, 3) == pytest.approx(3 * math.log(5), abs=1e-12)  # 4.83 < A_1
    counts, verdict = step(DEFAULTS, counts, True)
    assert verdict.decision is Decision.REJECT
    assert counts == SprtCounts(4, 4)  # kept on REJECT
    for test in (1, 2):  # 4 ln 5 = 6.44 is above A_1 and A_2, not A_3 = ln 1200 = 7.09
        assert DEFAULTS.decide(4, 4, test) is Decision.REJECT
    assert DEFAULTS.decide(4, 4, 3) is Decision.CONTINUE


def test_fifty_six_clean_responses_accept_and_fifty_five_do_not() -> None:
    counts, decisions = run(DEFAULTS, [False] * 55)
    assert set(decisions) == {Decision.CONTINUE}
    assert counts == SprtCounts(55, 0)
    counts, verdict = step(DEFAULTS, counts, False)
    assert verdict.decision is Decision.ACCEPT
    assert verdict.counts == SprtCounts(56, 0)
    assert verdict.llr == pytest.approx(56 * math.log(0.95 / 0.99), abs=1e-12)
    assert counts == SprtCounts()  # the test restarts


def test_monitoring_goes_on_after_accept_against_the_next_bound() -> None:
    counts, decisions = run(DEFAULTS, [False] * 56 + [True] * 4)
    assert decisions[55] is Decision.ACCEPT
    assert decisions[56:] == [Decision.CONTINUE] * 3 + [Decision.REJECT]  # 6.44 >= A_2 = 6.40
    assert counts == SprtCounts(4, 4)  # counted from the restart, not from 60 responses


# --- alpha spending (DESIGN 5) ---------------------------------------------------------------


@FIXED
@given(
    alpha=st.floats(min_value=1e-6, max_value=0.5, allow_nan=False),
    test=st.integers(1, 10**6),
)
def test_rejection_bound_is_ln_i_i_plus_1_over_alpha(alpha: float, test: int) -> None:
    expected = math.log(test) + math.log(test + 1) - math.log(alpha)
    assert rejection_bound(alpha, test) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert rejection_bound(alpha, test + 1) > rejection_bound(alpha, test)  # each test stricter
    bounds = SprtBounds(e0=0.01, e1=0.05, alpha=alpha, beta=min(0.1, 0.99 - alpha))
    assert bounds.a(test) == rejection_bound(alpha, test)


@FIXED
@given(alpha=st.floats(min_value=1e-6, max_value=0.5, allow_nan=False), tests=st.integers(1, 5000))
def test_the_tests_budgets_sum_to_alpha_spent_and_never_beyond_alpha(
    alpha: float, tests: int
) -> None:
    # Ville: test i's false rollback probability is at most exp(-A_i) = alpha/(i (i + 1)).
    budgets = sum(math.exp(-rejection_bound(alpha, i)) for i in range(1, tests + 1))
    assert budgets == pytest.approx(alpha_spent(alpha, tests), rel=1e-9)
    assert alpha_spent(alpha, tests) < alpha


def test_rejection_bound_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="numbered from 1"):
        rejection_bound(0.01, 0)
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        rejection_bound(0.0, 1)


@FIXED
@given(restarts=st.integers(0, 40), errors=st.integers(0, 12))
def test_a_test_restarted_i_times_is_judged_against_a_of_i_plus_1(
    restarts: int, errors: int
) -> None:
    """After `restarts` acceptances, `errors` consecutive errors reject iff llr >= A_{i}."""
    counts, test = SprtCounts(), 1
    for _ in range(restarts):
        for _ in range(56):
            counts, verdict = step(DEFAULTS, counts, False, test)
        assert verdict.decision is Decision.ACCEPT
        test += 1
    assert test == restarts + 1
    decision = Decision.CONTINUE
    for _ in range(errors):
        counts, verdict = step(DEFAULTS, counts, True, test)
        decision = verdict.decision
    threshold = math.log(test * (test + 1) / DEFAULTS.alpha)
    assert (decision is Decision.REJECT) == (errors * math.log(5) >= threshold)


# --- relative mode's increment -----------------------------------------------------------


@FIXED
@given(
    q=st.floats(min_value=1e-6, max_value=1 - 1e-6, allow_nan=False),
    ratio=st.floats(min_value=1.001, max_value=1000, allow_nan=False),
)
def test_relative_increment_is_the_bernoulli_log_likelihood_ratio(q: float, ratio: float) -> None:
    p1 = ratio * q / (ratio * q + 1 - q)
    from_canary = float(binom.logpmf(1, 1, p1) - binom.logpmf(1, 1, q))
    from_stable = float(binom.logpmf(0, 1, p1) - binom.logpmf(0, 1, q))
    assert relative_increment(q, ratio, from_canary=True) == pytest.approx(
        from_canary, rel=1e-9, abs=1e-9
    )
    assert relative_increment(q, ratio, from_canary=False) == pytest.approx(
        from_stable, rel=1e-9, abs=1e-9
    )
    # Under H0 its mean is -KL(q || p1) <= 0: exp(llr) is a supermartingale, as Ville needs.
    mean = q * from_canary + (1 - q) * from_stable
    assert mean <= 1e-12


def test_relative_increment_at_the_edges_and_bad_input() -> None:
    assert relative_increment(0.0, 2.0, from_canary=True) == pytest.approx(math.log(2))
    assert relative_increment(0.0, 2.0, from_canary=False) == 0.0
    assert relative_increment(1.0, 2.0, from_canary=True) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="ratio must be > 1"):
        relative_increment(0.5, 1.0, from_canary=True)
    with pytest.raises(ValueError, match="q must lie in"):
        relative_increment(1.5, 2.0, from_canary=True)


def test_counts_observe_and_plus() -> None:
    counts = SprtCounts().observe(True).observe(False)
    assert counts == SprtCounts(2, 1)
    assert counts.plus(SprtCounts(10, 2)) == SprtCounts(12, 3)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        SprtCounts(1, 2)


@pytest.mark.parametrize(
    ("e0", "e1", "alpha", "beta", "rule"),
    [
        (0.0, 0.05, 0.01, 0.1, "0 < e0 < e1 < 1"),
        (0.05, 0.05, 0.01, 0.1, "0 < e0 < e1 < 1"),
        (0.06, 0.05, 0.01, 0.1, "0 < e0 < e1 < 1"),
        (0.01, 1.0, 0.01, 0.1, "0 < e0 < e1 < 1"),
        (float("nan"), 0.05, 0.01, 0.1, "0 < e0 < e1 < 1"),
        (0.01, 0.05, 0.0, 0.1, "alpha > 0 and beta > 0"),
        (0.01, 0.05, 0.01, -0.1, "alpha > 0 and beta > 0"),
        (0.01, 0.05, 0.5, 0.5, "alpha \\+ beta < 1"),
    ],
)
def test_invalid_bounds_raise_naming_the_rule(
    e0: float, e1: float, alpha: float, beta: float, rule: str
) -> None:
    with pytest.raises(ValueError, match=rule):
        SprtBounds(e0=e0, e1=e1, alpha=alpha, beta=beta)


def test_fixed_sample_size_known_answers() -> None:
    # By hand: ((2.3263 * 0.0995 + 1.2816 * 0.2179) / 0.04)^2 = 163.06; and
    # ((1.6449 * 0.2179 + 1.6449 * 0.3) / 0.05)^2 = 290.32.
    assert fixed_sample_size(0.01, 0.05, 0.01, 0.10) == 164
    assert fixed_sample_size(0.05, 0.10, 0.05, 0.05) == 291
    with pytest.raises(ValueError, match="e0 < e1"):
        fixed_sample_size(0.05, 0.01, 0.01, 0.10)


def test_expected_sample_number_matches_walds_closed_forms() -> None:
    b = DEFAULTS
    drift0 = b.e0 * math.log(b.e1 / b.e0) + (1 - b.e0) * math.log((1 - b.e1) / (1 - b.e0))
    drift1 = b.e1 * math.log(b.e1 / b.e0) + (1 - b.e1) * math.log((1 - b.e1) / (1 - b.e0))
    # Wald's closed forms, with test 1's L(e0) = 1 - alpha and L(e1) = beta as approximations
    # of the operating characteristic for the bound A_1 (exact for Wald's own A).
    h0_accept = (math.exp(b.A) - 1) / (math.exp(b.A) - math.exp(b.B))
    h1_accept = (math.exp(-b.A) - 1) / (math.exp(-b.A) - math.exp(-b.B))
    at_e0 = (h0_accept * b.B + (1 - h0_accept) * b.A) / drift0
    at_e1 = (h1_accept * b.B + (1 - h1_accept) * b.A) / drift1
    assert expected_sample_number(b, b.e0) == pytest.approx(at_e0, rel=1e-9)
    assert expected_sample_number(b, b.e1) == pytest.approx(at_e1, rel=1e-9)
    assert expected_sample_number(b, 0.0) == pytest.approx(b.B / math.log(0.95 / 0.99))


def test_expected_sample_number_is_continuous_where_the_drift_vanishes() -> None:
    up, down = math.log(5), math.log(0.95 / 0.99)
    zero_drift = -down / (up - down)
    peak = expected_sample_number(DEFAULTS, zero_drift)
    second_moment = zero_drift * up**2 + (1 - zero_drift) * down**2
    assert peak == pytest.approx(-DEFAULTS.A * DEFAULTS.B / second_moment, rel=1e-9)
    # A_1 != -B, so the curve has a slope there: the nearer, the closer.
    for offset, rel in ((-1e-4, 1e-2), (-1e-6, 1e-4), (1e-6, 1e-4), (1e-4, 1e-2)):
        assert expected_sample_number(DEFAULTS, zero_drift + offset) == pytest.approx(peak, rel=rel)


# --- properties --------------------------------------------------------------------------

rates = st.floats(min_value=1e-4, max_value=0.9999, allow_nan=False)


@FIXED
@given(n=st.integers(0, 100_000), data=st.data(), e0=rates, e1=rates)
def test_llr_is_the_binomial_log_likelihood_ratio(
    n: int, data: st.DataObject, e0: float, e1: float
) -> None:
    assume(e0 < e1)
    k = data.draw(st.integers(0, n))
    bounds = SprtBounds(e0=e0, e1=e1, alpha=0.05, beta=0.05)
    direct = k * (math.log(e1) - math.log(e0)) + (n - k) * (math.log1p(-e1) - math.log1p(-e0))
    scipy_ratio = float(binom.logpmf(k, n, e1) - binom.logpmf(k, n, e0))
    scale = abs(k * math.log(e1 / e0)) + abs((n - k) * math.log((1 - e1) / (1 - e0)))
    assert bounds.llr(n, k) == pytest.approx(direct, rel=1e-9, abs=1e-9 * (1 + scale))
    # logpmf of each hypothesis is large and carries its own rounding: a looser tolerance.
    assert bounds.llr(n, k) == pytest.approx(scipy_ratio, rel=1e-6, abs=1e-6 * (1 + scale))


@FIXED
@given(errors=st.lists(st.booleans(), max_size=400))
def test_step_is_decide_on_counts_since_the_last_accept(errors: list[bool]) -> None:
    n = k = 0
    counts = SprtCounts()
    for error in errors:
        n, k = n + 1, k + error
        counts, verdict = step(DEFAULTS, counts, error)
        assert verdict.decision is DEFAULTS.decide(n, k)
        assert verdict.counts == SprtCounts(n, k)
        if verdict.decision is Decision.ACCEPT:
            n = k = 0
        assert counts == SprtCounts(n, k)


# --- guarantees by simulation ------------------------------------------------------------

RUNS = 100_000
CAP = 20_000  # samples; a run still undecided here counts as CONTINUE
SEED = 20240601
CONFIGS = [DEFAULTS, SprtBounds(e0=0.05, e1=0.10, alpha=0.05, beta=0.05)]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Simulation:
    """Where `RUNS` independent tests at error rate e stopped, and why."""

    rejected: int
    accepted: int
    capped: int
    mean_samples: float

    @property
    def runs(self) -> int:
        return self.rejected + self.accepted + self.capped


def thresholds(bounds: SprtBounds, cap: int) -> tuple[IntArray, IntArray]:
    """Per n <= cap: the least k that `decide` rejects (n + 1 if none), the most it accepts (-1).

    llr rises with k and falls with n, so both thresholds only move up: one sweep of `decide`
    suffices, and the simulation below then compares integers instead of re-deriving the test.
    """
    reject_at = np.zeros(cap + 1, dtype=np.int64)
    accept_at = np.full(cap + 1, -1, dtype=np.int64)
    reject_k, accept_k = 0, -1
    for n in range(cap + 1):
        while reject_k <= n and bounds.decide(n, reject_k) is not Decision.REJECT:
            reject_k += 1
        while accept_k + 1 <= n and bounds.decide(n, accept_k + 1) is Decision.ACCEPT:
            accept_k += 1
        reject_at[n], accept_at[n] = reject_k, accept_k
    return reject_at, accept_at


@cache
def simulate(bounds: SprtBounds, e: float, seed: int = SEED, chunk: int = 64) -> Simulation:
    """Run `RUNS` tests at error rate e to their first decision, a chunk of samples at a time."""
    rng = np.random.default_rng(seed)
    reject_at, accept_at = thresholds(bounds, CAP)
    outcome = np.zeros(RUNS, dtype=np.int8)  # 0 capped, 1 accepted, 2 rejected
    stopped_at = np.full(RUNS, CAP, dtype=np.int64)
    errors_so_far = np.zeros(RUNS, dtype=np.int64)
    active = np.arange(RUNS)
    seen = 0
    while active.size and seen < CAP:
        width = min(chunk, CAP - seen)
        k = errors_so_far[active, None] + np.cumsum(rng.random((active.size, width)) < e, axis=1)
        n = np.arange(seen + 1, seen + width + 1)
        reject, accept = k >= reject_at[n], k <= accept_at[n]
        decided = reject | accept
        done = decided.any(axis=1)
        first = decided.argmax(axis=1)[done]
        outcome[active[done]] = np.where(reject[done, first], 2, 1)
        stopped_at[active[done]] = n[first]
        errors_so_far[active] = k[:, -1]
        active, seen = active[~done], seen + width
    return Simulation(
        rejected=int((outcome == 2).sum()),
        accepted=int((outcome == 1).sum()),
        capped=int((outcome == 0).sum()),
        mean_samples=float(stopped_at.mean()),
    )


def label(bounds: SprtBounds) -> str:
    return f"e0={bounds.e0} e1={bounds.e1} alpha={bounds.alpha} beta={bounds.beta}"


def three_se(p: float) -> float:
    return 3 * math.sqrt(p * (1 - p) / RUNS)


def test_thresholds_agree_with_decide_everywhere_small() -> None:
    for bounds in CONFIGS:
        reject_at, accept_at = thresholds(bounds, 300)
        for n in range(301):
            for k in range(n + 1):
                expected = bounds.decide(n, k)
                got = (
                    Decision.REJECT
                    if k >= reject_at[n]
                    else Decision.ACCEPT
                    if k <= accept_at[n]
                    else Decision.CONTINUE
                )
                assert got is expected, (n, k)


@pytest.mark.slow
@pytest.mark.parametrize("bounds", CONFIGS, ids=label)
def test_rollback_rate_at_e0_is_at_most_alpha(bounds: SprtBounds) -> None:
    sim = simulate(bounds, bounds.e0)
    rate = sim.rejected / sim.runs
    print(f"\n[{label(bounds)}] rejection rate at e0 = {rate:.4f} over {sim.runs} runs")
    assert sim.runs == RUNS
    assert rate <= bounds.alpha + three_se(bounds.alpha)
    assert sim.capped / RUNS < 0.001  # the cap hides nothing


@pytest.mark.slow
@pytest.mark.parametrize("bounds", CONFIGS, ids=label)
def test_miss_rate_at_e1_is_at_most_beta(bounds: SprtBounds) -> None:
    sim = simulate(bounds, bounds.e1)
    rate = sim.accepted / sim.runs
    print(f"\n[{label(bounds)}] miss rate at e1 = {rate:.4f} over {sim.runs} runs")
    assert rate <= bounds.beta + three_se(bounds.beta)
    assert sim.capped / RUNS < 0.001


@pytest.mark.slow
@pytest.mark.parametrize("bounds", CONFIGS, ids=label)
def test_mean_sample_number_is_below_the_fixed_sample_test(bounds: SprtBounds) -> None:
    at_e0, at_e1 = simulate(bounds, bounds.e0), simulate(bounds, bounds.e1)
    fixed = fixed_sample_size(bounds.e0, bounds.e1, bounds.alpha, bounds.beta)
    wald0 = expected_sample_number(bounds, bounds.e0)
    wald1 = expected_sample_number(bounds, bounds.e1)
    print(
        f"\nSPRT Monte Carlo ({label(bounds)}; {RUNS} runs per rate, seed {SEED}, cap {CAP}):"
        f" rejection rate at e0 {at_e0.rejected / RUNS:.4f},"
        f" miss rate at e1 {at_e1.accepted / RUNS:.4f},"
        f" ASN at e0 {at_e0.mean_samples:.1f} (Wald {wald0:.1f}),"
        f" ASN at e1 {at_e1.mean_samples:.1f} (Wald {wald1:.1f}),"
        f" fixed-sample n {fixed}, capped runs {at_e0.capped + at_e1.capped}"
    )
    assert at_e0.mean_samples < fixed
    assert at_e1.mean_samples < fixed
