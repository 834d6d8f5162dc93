"""Paired statistics (DESIGN 6) against scipy as the oracle."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence

import numpy as np
import pytest
import scipy.stats
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.core.paired import (
    MIN_WILCOXON_PAIRS,
    PERMUTATION_MAX_N,
    PairedTest,
    RunningStats,
    paired_ttest,
    wilcoxon_test,
)

# Fixed seeds: the same examples on every run. No deadline: scipy's first calls (and a busy
# shared runner) exceed hypothesis' 200 ms, which measures nothing we promise.
FIXED = settings(derandomize=True, deadline=None)

finite = st.floats(
    min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False
)
samples = st.lists(finite, min_size=2, max_size=80)


def well_conditioned(xs: Sequence[float]) -> bool:
    """Whether the spread is not lost in the magnitude (condition number below 1e5).

    Every one-pass variance, Welford's included, loses about log10(condition number) digits
    relative to scipy's two-pass one; beyond 1e5 agreement to 1e-9 is not a property of a
    correct implementation any more.
    """
    values = np.asarray(xs, dtype=float)
    m2 = float(np.sum((values - values.mean()) ** 2))
    return m2 > 0 and math.sqrt(float(np.sum(values**2)) / m2) < 1e5


def assert_matches_scipy(shadow: Sequence[float], primary: Sequence[float]) -> PairedTest:
    """paired_ttest on d = shadow - primary equals scipy.stats.ttest_rel(shadow, primary)."""
    diffs = [s - p for s, p in zip(shadow, primary, strict=True)]
    ours = paired_ttest(RunningStats.of(diffs))
    theirs = scipy.stats.ttest_rel(shadow, primary)
    assert ours is not None
    assert ours.n == len(diffs)
    assert ours.df == int(theirs.df) == len(diffs) - 1
    assert ours.mean_diff == pytest.approx(np.mean(diffs), rel=1e-9, abs=1e-12)
    assert ours.sd == pytest.approx(np.std(diffs, ddof=1), rel=1e-9)
    assert ours.t == pytest.approx(float(theirs.statistic), rel=1e-9, abs=1e-9)
    # p is a probability: relative agreement where it is sizeable, absolute in the far tail.
    assert ours.p == pytest.approx(float(theirs.pvalue), rel=1e-9, abs=1e-12)
    low, high = theirs.confidence_interval(0.95)
    half_width = (float(high) - float(low)) / 2
    assert ours.ci95[0] == pytest.approx(float(low), rel=1e-9, abs=1e-9 * half_width)
    assert ours.ci95[1] == pytest.approx(float(high), rel=1e-9, abs=1e-9 * half_width)
    return ours


# --- the t-test --------------------------------------------------------------------------


@FIXED
@given(pairs=st.lists(st.tuples(finite, finite), min_size=2, max_size=80))
def test_paired_ttest_equals_scipy_on_drawn_pairs(pairs: list[tuple[float, float]]) -> None:
    shadow, primary = [s for s, _ in pairs], [p for _, p in pairs]
    assume(well_conditioned([s - p for s, p in pairs]))
    assert_matches_scipy(shadow, primary)


@pytest.mark.parametrize(
    ("n", "offset", "noise"),
    [(2, 0.3, 1.0), (30, 0.0, 1.0), (600, 0.1, 0.058), (5000, -2.0, 40.0), (50, 1e-3, 1e3)],
)
def test_paired_ttest_equals_scipy_on_seeded_data(n: int, offset: float, noise: float) -> None:
    rng = np.random.default_rng(7)
    primary = rng.lognormal(mean=3.0, sigma=0.5, size=n)  # latency-like, skewed
    shadow = primary + offset + rng.uniform(-noise, noise, size=n)
    result = assert_matches_scipy(shadow.tolist(), primary.tolist())
    if n == 600:  # the model server's +0.1 score offset, as in DESIGN 8's example
        assert result.ci95[0] < 0.1 < result.ci95[1]
        assert result.p < 1e-100


def test_paired_ttest_is_none_when_undefined() -> None:
    assert paired_ttest(RunningStats()) is None
    assert paired_ttest(RunningStats.of([4.2])) is None
    assert paired_ttest(RunningStats.of([0.25] * 50)) is None  # sd = 0: scipy gives NaN


def test_as_dict_has_the_status_fields_and_is_json() -> None:
    result = paired_ttest(RunningStats.of([0.1, 0.3, 0.2, 0.4]))
    assert result is not None
    doc = result.as_dict()
    assert list(doc) == ["n", "mean_diff", "t", "df", "p", "ci95"]
    assert doc["n"] == 4
    assert doc["df"] == 3
    assert isinstance(doc["ci95"], list)
    assert json.loads(json.dumps(doc)) == doc


# --- running stats and their merge -------------------------------------------------------


@FIXED
@given(values=samples, cuts=st.lists(st.integers(0, 80), max_size=6))
def test_merging_partial_stats_equals_stats_of_all(values: list[float], cuts: list[int]) -> None:
    assume(well_conditioned(values) or len(set(values)) == 1)
    bounds = [0, *sorted(c % (len(values) + 1) for c in cuts), len(values)]
    parts = [RunningStats.of(values[a:b]) for a, b in itertools.pairwise(bounds)]
    merged = RunningStats()
    for part in parts:
        merged = merged.merge(part)
    whole = RunningStats.of(values)
    scale = max(abs(v) for v in values)
    assert merged.n == whole.n == len(values)
    assert merged.mean == pytest.approx(whole.mean, rel=1e-9, abs=1e-12 * scale)
    assert merged.m2 == pytest.approx(whole.m2, rel=1e-9, abs=1e-12 * scale**2)
    # and both equal the two-pass answer
    assert whole.mean == pytest.approx(float(np.mean(values)), rel=1e-9, abs=1e-12 * scale)
    two_pass = float(np.sum((np.asarray(values) - np.mean(values)) ** 2))
    assert whole.m2 == pytest.approx(two_pass, rel=1e-9, abs=1e-12 * scale**2)


def test_running_stats_known_answer() -> None:
    stats = RunningStats.of([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert (stats.n, stats.mean, stats.m2) == (8, 5.0, 32.0)
    assert stats.variance == pytest.approx(32.0 / 7)
    assert RunningStats.of([1.0]).variance is None
    assert RunningStats().merge(stats) == stats == stats.merge(RunningStats())


def test_running_stats_refuse_what_would_poison_them() -> None:
    with pytest.raises(ValueError, match="finite"):
        RunningStats().add(float("nan"))
    with pytest.raises(ValueError, match="finite"):
        RunningStats.of([1.0, float("inf")])
    with pytest.raises(ValueError, match="m2 >= 0"):
        RunningStats(n=3, mean=0.0, m2=-1.0)
    with pytest.raises(ValueError, match="n >= 0"):
        RunningStats(n=-1)


# --- the signed-rank test ----------------------------------------------------------------


@pytest.mark.parametrize(("n", "shift"), [(10, 0.5), (40, 0.0), (2000, 0.05)])
def test_wilcoxon_equals_scipy_on_seeded_data(n: int, shift: float) -> None:
    diffs = (np.random.default_rng(11).standard_t(df=3, size=n) + shift).tolist()
    ours = wilcoxon_test(diffs)
    theirs = scipy.stats.wilcoxon(diffs, alternative="two-sided")
    assert ours is not None
    assert ours.n == n
    assert ours.statistic == float(theirs.statistic)
    assert ours.p == float(theirs.pvalue)


@FIXED
@given(diffs=st.lists(st.integers(-5, 5).map(float), max_size=60))
def test_wilcoxon_equals_scipy_with_ties_and_zeros(diffs: list[float]) -> None:
    nonzero = sum(d != 0 for d in diffs)
    ours = wilcoxon_test(diffs)
    if nonzero < MIN_WILCOXON_PAIRS:
        assert ours is None
        return
    if len(diffs) <= PERMUTATION_MAX_N:
        return  # scipy's own permutation branch takes seconds a call: the seeded cases below
    theirs = scipy.stats.wilcoxon(diffs, alternative="two-sided")
    assert ours is not None
    assert (ours.n, ours.pairs, ours.statistic, ours.p) == (
        nonzero,
        len(diffs),
        float(theirs.statistic),
        float(theirs.pvalue),
    )


SMALL_WITH_TIES = [
    [1.0, 2, 2, 3, -1, 4, 4, 5, 6, -2],  # the normal approximation says 0.0244, scipy 0.0254
    [0.0, 1, -1, 2, 2, 3, 3, 3, -4, 5, 6],
    [0.0, 0, 1, 2, -2, 3, 4, 4, 5, 6, 7, -7, 8],
    [2.5, 2.5, 2.5, -2.5, 1, 1, -1, 3, 3, 4, 4, 4, 5],
]


@pytest.mark.parametrize("diffs", SMALL_WITH_TIES)
def test_wilcoxon_equals_scipy_auto_on_small_samples_with_ties(diffs: list[float]) -> None:
    ours = wilcoxon_test(diffs)
    theirs = scipy.stats.wilcoxon(diffs, alternative="two-sided")  # its permutation test
    assert ours is not None
    assert ours.statistic == float(theirs.statistic)
    assert ours.p == pytest.approx(float(theirs.pvalue), rel=1e-12)


@FIXED
@given(signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=10, max_size=60))
def test_wilcoxon_equals_scipy_auto_without_ties(signs: list[float]) -> None:
    diffs = [sign * (i + 1) / 7 for i, sign in enumerate(signs)]
    ours = wilcoxon_test(diffs)
    theirs = scipy.stats.wilcoxon(diffs, alternative="two-sided")  # exact up to 50 values
    assert ours is not None
    assert (ours.statistic, ours.p) == (float(theirs.statistic), float(theirs.pvalue))


def test_wilcoxon_finds_a_shift_in_skewed_latencies() -> None:
    np_rng = np.random.default_rng(5)
    primary = np_rng.lognormal(3.0, 1.0, size=10_000)
    shadow = primary * 1.02 + np_rng.normal(0.0, 1.0, size=10_000)  # 2 % slower
    result = wilcoxon_test((shadow - primary).tolist())
    assert result is not None
    assert (result.n, result.pairs) == (10_000, 10_000)
    assert result.p < 1e-6
    assert result.as_dict() == {
        "pairs": 10_000,
        "n": 10_000,
        "statistic": result.statistic,
        "p": result.p,
    }


def test_wilcoxon_refuses_non_finite_differences() -> None:
    with pytest.raises(ValueError, match="finite"):
        wilcoxon_test([1.0] * 12 + [float("nan")])
