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
    E0_FLOOR,
    Decision,
    SprtBounds,
    SprtCounts,
    evaluate,
    expected_sample_number,
    fixed_sample_size,
    relative_bounds,
    step,
)

DEFAULTS = SprtBounds(e0=0.01, e1=0.05, alpha=0.01, beta=0.10)

# Fixed seeds: the same examples on every run. No deadline: scipy's first calls (and a busy
# shared runner) exceed hypothesis' 200 ms, which measures nothing we promise.
FIXED = settings(derandomize=True, deadline=None)


def run(bounds: SprtBounds, errors: list[bool]) -> tuple[SprtCounts, list[Decision]]:
    """Feed `errors` through `step` from fresh counts; the counts left and every decision."""
    counts, decisions = SprtCounts(), []
    for error in errors:
        counts, verdict = step(bounds, counts, error)
        decisions.append(verdict.decision)
    return counts, decisions


# --- known answers -----------------------------------------------------------------------


def test_default_bounds_are_the_documented_numbers() -> None:
    assert abs(DEFAULTS.A - math.log(90)) <= 1e-12
    assert abs(DEFAULTS.B - math.log(0.1 / 0.99)) <= 1e-12
    assert round(DEFAULTS.A, 4) == 4.4998
    assert round(DEFAULTS.B, 4) == -2.2925


def test_three_consecutive_errors_reject_and_two_do_not() -> None:
    counts, decisions = run(DEFAULTS, [True, True, True])
    assert decisions == [Decision.CONTINUE, Decision.CONTINUE, Decision.REJECT]
    assert counts == SprtCounts(3, 3)  # kept on REJECT
    assert DEFAULTS.llr(3, 3) == pytest.approx(3 * math.log(5), abs=1e-12)


def test_fifty_six_clean_responses_accept_and_fifty_five_do_not() -> None:
    counts, decisions = run(DEFAULTS, [False] * 55)
    assert set(decisions) == {Decision.CONTINUE}
    assert counts == SprtCounts(55, 0)
    counts, verdict = step(DEFAULTS, counts, False)
    assert verdict.decision is Decision.ACCEPT
    assert verdict.counts == SprtCounts(56, 0)
    assert verdict.llr == pytest.approx(56 * math.log(0.95 / 0.99), abs=1e-12)
    assert counts == SprtCounts()  # the test restarts


def test_monitoring_goes_on_after_accept() -> None:
    counts, decisions = run(DEFAULTS, [False] * 56 + [True] * 3)
    assert decisions[55] is Decision.ACCEPT
    assert decisions[56:] == [Decision.CONTINUE, Decision.CONTINUE, Decision.REJECT]
    assert counts == SprtCounts(3, 3)  # counted from the restart, not from 59 responses


def test_counts_are_kept_so_a_moved_e0_re_judges_them() -> None:
    counts = SprtCounts(100, 3)
    assert evaluate(DEFAULTS, counts).decision is Decision.CONTINUE
    tighter = relative_bounds(0.0, epsilon=0.005, alpha=0.01, beta=0.10)
    verdict = evaluate(tighter, counts)
    assert verdict.decision is Decision.REJECT
    assert verdict.llr == pytest.approx(3 * math.log(6) + 97 * math.log(0.994 / 0.999))


def test_counts_observe_and_plus() -> None:
    counts = SprtCounts().observe(True).observe(False)
    assert counts == SprtCounts(2, 1)
    assert counts.plus(SprtCounts(10, 2)) == SprtCounts(12, 3)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        SprtCounts(1, 2)


def test_relative_bounds_floor_and_epsilon() -> None:
    floor = relative_bounds(0.0, epsilon=0.005, alpha=0.01, beta=0.10)
    assert (floor.e0, floor.e1) == (E0_FLOOR, pytest.approx(0.006))
    moved = relative_bounds(0.02, epsilon=0.005, alpha=0.02, beta=0.05)
    assert (moved.e0, moved.e1, moved.alpha, moved.beta) == (0.02, pytest.approx(0.025), 0.02, 0.05)
    broken_stable = relative_bounds(1.0, epsilon=0.05, alpha=0.01, beta=0.10)
    assert 0 < broken_stable.e0 < broken_stable.e1 < 1  # still usable bounds
    with pytest.raises(ValueError, match="epsilon"):
        relative_bounds(0.01, epsilon=0.0, alpha=0.01, beta=0.10)
    with pytest.raises(ValueError, match="stable_error_rate"):
        relative_bounds(float("nan"), epsilon=0.01, alpha=0.01, beta=0.10)


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
    at_e0 = ((1 - b.alpha) * b.B + b.alpha * b.A) / drift0
    at_e1 = (b.beta * b.B + (1 - b.beta) * b.A) / drift1
    assert expected_sample_number(b, b.e0) == pytest.approx(at_e0, rel=1e-9)
    assert expected_sample_number(b, b.e1) == pytest.approx(at_e1, rel=1e-9)
    assert expected_sample_number(b, 0.0) == pytest.approx(b.B / math.log(0.95 / 0.99))


def test_expected_sample_number_is_continuous_where_the_drift_vanishes() -> None:
    up, down = math.log(5), math.log(0.95 / 0.99)
    zero_drift = -down / (up - down)
    peak = expected_sample_number(DEFAULTS, zero_drift)
    second_moment = zero_drift * up**2 + (1 - zero_drift) * down**2
    assert peak == pytest.approx(-DEFAULTS.A * DEFAULTS.B / second_moment, rel=1e-9)
    for offset in (-1e-4, -1e-6, 1e-6, 1e-4):
        assert expected_sample_number(DEFAULTS, zero_drift + offset) == pytest.approx(
            peak, rel=1e-3
        )


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
