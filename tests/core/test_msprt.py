"""The always-valid p-value and confidence sequence (DESIGN 6), and Holm's procedure.

Known answers come from integrating the normal mixture numerically (scipy.integrate.quad), an
independent route to the closed form. The guarantees are checked by seeded simulation, looking
after every pair: under the null the always-valid p-value stays above 0.01 in all but about
1 % of runs where the plain t-test's p-value does not; under an offset it finds it; the
confidence sequence covers the true mean at every look.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import stdtrit

from gateway.core.msprt import (
    CS_ALPHA,
    DEFAULT_TAU_AT_N,
    AlwaysValid,
    always_valid,
    default_tau,
    holm,
)
from gateway.core.paired import RunningStats
from gateway.core.totals import Totals

FIXED = settings(derandomize=True, deadline=None)


def mixture_lambda(n: int, mean: float, variance: float, tau: float, theta: float = 0.0) -> float:
    """Lambda_n(theta) by integration: the likelihood ratio of the sample mean (known variance
    `variance / n`) averaged over true means theta + N(0, tau^2)."""
    se = math.sqrt(variance / n)

    def ratio(delta: float) -> float:
        shifted = scipy.stats.norm.logpdf(mean, theta + delta, se)
        null = scipy.stats.norm.logpdf(mean, theta, se)
        return math.exp(shifted - null) * scipy.stats.norm.pdf(delta, 0.0, tau)

    spread = 12 * max(tau, se)
    value, _ = scipy.integrate.quad(ratio, -spread, spread, points=[0.0, mean - theta], limit=200)
    return float(value)


CASES = [  # (n, mean, variance, tau)
    (10, 0.3, 1.0, 1.0),
    (100, 0.05, 0.25, 0.1),
    (2500, -0.02, 1.0, 0.5),
    (400, 0.0, 4.0, 2.0),
]


@pytest.mark.parametrize(("n", "mean", "variance", "tau"), CASES)
def test_always_valid_p_is_one_over_the_mixture_likelihood_ratio(
    n: int, mean: float, variance: float, tau: float
) -> None:
    stats = RunningStats(n, mean, variance * (n - 1))
    result = always_valid(stats, tau)
    assert result is not None
    expected = min(1.0, 1.0 / mixture_lambda(n, mean, variance, tau))
    assert result.p == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize(("n", "mean", "variance", "tau"), CASES)
def test_the_confidence_sequence_ends_where_lambda_reaches_one_over_alpha(
    n: int, mean: float, variance: float, tau: float
) -> None:
    result = always_valid(RunningStats(n, mean, variance * (n - 1)), tau)
    assert result is not None
    low, high = result.cs95
    assert low < mean < high and mean - low == pytest.approx(high - mean, rel=1e-12)
    for edge in (low, high):
        assert mixture_lambda(n, mean, variance, tau, theta=edge) == pytest.approx(
            1 / CS_ALPHA, rel=1e-6
        )
    inside = mixture_lambda(n, mean, variance, tau, theta=(mean + high) / 2)
    assert inside < 1 / CS_ALPHA


def test_undefined_cases_are_none() -> None:
    assert always_valid(RunningStats(1, 0.5, 0.0), 1.0) is None
    assert always_valid(RunningStats(5, 0.5, 0.0), 1.0) is None  # no spread
    assert always_valid(RunningStats(5, 0.5, 1.0), 0.0) is None
    assert always_valid(RunningStats(5, 0.5, 1.0), math.inf) is None


def test_default_tau_is_the_sd_from_100_pairs_on() -> None:
    values = np.random.default_rng(3).normal(2.0, 3.0, size=150).tolist()
    assert default_tau(RunningStats.of(values[:99])) is None
    at_100 = RunningStats.of(values[:100])
    assert default_tau(at_100) == pytest.approx(float(np.std(values[:100], ddof=1)), rel=1e-12)
    assert DEFAULT_TAU_AT_N == 100


def test_totals_freeze_tau_and_keep_the_running_minimum() -> None:
    values = np.random.default_rng(4).normal(size=300).tolist()
    totals = Totals().merge(RunningStats.of(values[:80]), p_look=0.4)
    assert totals.tau is None and totals.p_min == 0.4
    totals = totals.merge(RunningStats.of(values[80:120]), unmeasured=3, p_look=0.9)
    frozen = default_tau(RunningStats.of(values[:80]).merge(RunningStats.of(values[80:120])))
    assert totals.tau == frozen and totals.p_min == 0.4 and totals.unmeasured == 3
    totals = totals.merge(RunningStats.of(values[120:]), p_look=0.1)
    assert totals.tau == frozen and totals.p_min == 0.1 and totals.stats.n == 300


# --- Holm -----------------------------------------------------------------------------------


def holm_adjusted(pvalues: list[float]) -> list[float]:
    """Holm's adjusted p-values: p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@FIXED
@given(
    pvalues=st.lists(st.floats(0.0, 1.0), max_size=12),
    alpha=st.sampled_from([0.01, 0.05, 0.1]),
)
def test_holm_rejects_exactly_where_the_adjusted_p_is_at_most_alpha(
    pvalues: list[float], alpha: float
) -> None:
    assert holm(pvalues, alpha) == [a <= alpha for a in holm_adjusted(pvalues)]


def test_holm_steps_down_and_skips_missing_tests() -> None:
    # m = 3: 0.003 <= 0.01/3, 0.004 <= 0.01/2, 0.02 > 0.01: two rejections
    assert holm([0.02, None, 0.003, 0.004], 0.01) == [False, False, True, True]
    # Bonferroni (0.01 / 3 each) would reject only the first; Holm steps down to all three
    assert holm([0.001, 0.009, 0.0045], 0.01) == [True, True, True]
    # and stops at its first failure: 0.004 > 0.01 / 3, so nothing
    assert holm([0.004, 0.0049, 0.0045], 0.01) == [False, False, False]
    assert holm([0.0034, 0.5], 0.01) == [True, False]
    assert holm([0.006, 0.006], 0.01) == [False, False]


# --- peeking: looking after every pair ------------------------------------------------------

PAIRS, RUNS, BATCH = 20_000, 2_000, 50
LEVEL = 0.01


def vectorized(n: np.ndarray, mean: np.ndarray, var: np.ndarray, tau2: np.ndarray) -> tuple:
    """`always_valid` on arrays: (log Lambda_n at theta = 0, CS half-width)."""
    spread = var + n * tau2
    scale = 2.0 * var * spread / (n * n * tau2)
    log_shrink = 0.5 * np.log(spread / var)
    half_width = np.sqrt(scale * (math.log(1 / CS_ALPHA) + log_shrink))
    return mean * mean / scale - log_shrink, half_width


def simulate(offset: float, runs: int, seed: int) -> dict[str, np.ndarray]:
    """Runs of PAIRS normal differences (sd 1, mean `offset`), every look from pair 2 on; tau is
    the sample sd at pair 100 as in the gateway. Per run: whether the plain p ever fell below
    LEVEL, the first pair where the always-valid p did (PAIRS + 1: never), and whether the CS
    covered `offset` at every look."""
    rng = np.random.default_rng(seed)
    n = np.arange(1, PAIRS + 1, dtype=float)
    critical = stdtrit(n[1:] - 1, 1 - LEVEL / 2)  # plain p < LEVEL  <=>  |t| > critical
    plain, first, covered = [], [], []
    for _ in range(runs // BATCH):
        x = rng.standard_normal((BATCH, PAIRS)) + offset
        mean = np.cumsum(x, axis=1) / n
        var = np.full_like(mean, np.nan)
        var[:, 1:] = (np.cumsum(x * x, axis=1)[:, 1:] - n[1:] * mean[:, 1:] ** 2) / (n[1:] - 1)
        t = mean[:, 1:] / np.sqrt(var[:, 1:] / n[1:])
        plain.append(np.any(np.abs(t) > critical, axis=1))
        looks = slice(DEFAULT_TAU_AT_N - 1, None)
        log_lambda, half = vectorized(n[looks], mean[:, looks], var[:, looks], var[:, 99:100])
        crossed = log_lambda > math.log(1 / LEVEL)  # p = 1/Lambda < LEVEL
        first.append(np.where(crossed.any(axis=1), crossed.argmax(axis=1) + 100, PAIRS + 1))
        covered.append(np.all(np.abs(mean[:, looks] - offset) < half, axis=1))
    return {k: np.concatenate(v) for k, v in (("plain", plain), ("first", first), ("cs", covered))}


def test_the_vectorized_form_is_the_gateway_s_function() -> None:
    rng = np.random.default_rng(99)
    for offset in (0.0, 0.1):
        x = rng.standard_normal(3000) + offset
        stats, tau = RunningStats(), None
        for i, value in enumerate(x.tolist(), start=1):
            stats = stats.add(value)
            tau = tau or default_tau(stats)
            if tau is None or i % 7:
                continue
            ours = always_valid(stats, tau)
            assert isinstance(ours, AlwaysValid)
            n, var = np.float64(i), np.float64(np.var(x[:i], ddof=1))
            log_lambda, half = vectorized(n, np.float64(x[:i].mean()), var, np.float64(tau**2))
            assert ours.p == pytest.approx(min(1.0, math.exp(-log_lambda)), rel=1e-8)
            assert ours.cs95[1] - stats.mean == pytest.approx(float(half), rel=1e-9)


def three_sigma(p: float, runs: int) -> float:
    return 3 * math.sqrt(p * (1 - p) / runs)


def test_under_the_null_the_always_valid_p_keeps_its_level_where_the_plain_p_does_not() -> None:
    result = simulate(0.0, RUNS, seed=2026)
    bound = LEVEL + three_sigma(LEVEL, RUNS)
    always = float(np.mean(result["first"] <= PAIRS))
    plain = float(np.mean(result["plain"]))
    covered = float(np.mean(result["cs"]))
    print(f"null, {RUNS} runs of {PAIRS} pairs, a look after every pair: P(p < {LEVEL} at some")
    print(f"look) plain {plain:.4f}, always-valid {always:.4f}; CS covers 0 always {covered:.4f}")
    assert always <= bound
    assert plain > bound  # peeking at the plain p-value is what this protects from
    assert covered >= 1 - CS_ALPHA - three_sigma(CS_ALPHA, RUNS)


DETECTION_RUNS = 400
DETECTED_WITHIN = 5_000  # pairs, in at least 99 % of runs (the median is about 1,300)


def test_an_offset_of_a_tenth_of_an_sd_is_found_and_covered() -> None:
    result = simulate(0.1, DETECTION_RUNS, seed=7)
    first = result["first"]
    covered = float(np.mean(result["cs"]))
    print(
        f"offset 0.1 sd: always-valid p < {LEVEL} after a median of {np.median(first):.0f} "
        f"pairs (90 % by {np.percentile(first, 90):.0f}, all by {first.max()}); CS covers 0.1 "
        f"at every look in {covered:.4f} of runs"
    )
    assert np.mean(first <= DETECTED_WITHIN) >= 0.99
    assert np.all(first <= PAIRS)  # every run finds it within the 20,000 pairs
    assert covered >= 1 - CS_ALPHA - three_sigma(CS_ALPHA, DETECTION_RUNS)
