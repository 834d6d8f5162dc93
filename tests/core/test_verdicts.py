"""A replica's shadow comparisons (control/shadowstats.py): the always-valid p-value never rises
across looks, and the verdict applies Holm's correction over every comparison of a flag."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.control.shadowstats import ShadowStats, verdicts
from gateway.core.paired import RunningStats
from gateway.core.totals import Totals

FIXED = settings(derandomize=True, deadline=None, max_examples=50)


@FIXED
@given(
    offset=st.floats(-0.5, 0.5),
    batches=st.lists(st.integers(1, 80), min_size=2, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_the_always_valid_p_never_rises_across_looks_and_flushes(
    offset: float, batches: list[int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    stats = ShadowStats("json:/score")
    fleet, seen = Totals(), []
    for size in batches:
        for d in (rng.standard_normal(size) + offset).tolist():
            stats.add(d)
        seen.append(stats.look()["p_always_valid"])
        pending, unmeasured, _ = stats.take_pending()  # a flush, as the store merges it
        fleet = fleet.merge(pending, unmeasured=unmeasured, p_look=stats.p_min)
        stats.fleet = fleet
        seen.append(stats.look()["p_always_valid"])
    known = [p for p in seen if p is not None]
    assert all(later <= earlier for earlier, later in itertools.pairwise(known))
    assert all(0.0 < p <= 1.0 for p in known)
    if fleet.stats.n >= 100:
        assert fleet.tau is not None and known  # frozen at the first flush past 100 pairs


def entry(shadow: str, metric: str, p: float | None, mean: float = 0.1) -> dict[str, object]:
    return {
        "shadow": shadow,
        "metric": metric,
        "n": 500,
        "t": 3.0,
        "tau": 1.0,
        "mean_diff": mean,
        "p_always_valid": p,
    }


def test_verdicts_apply_holm_over_every_comparison() -> None:
    entries = [
        entry("v3", "json:/score", 0.003),  # 0.003 <= 0.01 / 3
        entry("v3", "latency_ms", 0.004, mean=-2.0),  # 0.004 <= 0.01 / 2
        entry("v4", "json:/score", 0.02),  # 0.02 > 0.01
        entry("v4", "agreement", None) | {"agreement": None},
    ]
    verdicts(entries)
    assert [e["direction"] for e in entries] == [1, -1, 0, 0]
    assert entries[0]["verdict"] == "shadow higher (always-valid p < 0.01, Holm over 3)"
    assert entries[1]["verdict"] == "shadow lower (always-valid p < 0.01, Holm over 3)"
    assert entries[2]["verdict"] == "no difference shown (always-valid p = 0.02, Holm over 3)"
    assert entries[3]["verdict"] == "no pairs yet"
    # The same p-value alone is significant; among nine comparisons it is not.
    alone = [entry("v3", "json:/score", 0.004)]
    crowd = [entry("v3", "json:/score", 0.004)]
    crowd += [entry(f"s{i}", "latency_ms", 0.5) for i in range(8)]
    verdicts(alone)
    verdicts(crowd)
    assert alone[0]["direction"] == 1 and crowd[0]["direction"] == 0


def test_untested_comparisons_say_why() -> None:
    zero_spread = entry("v3", "error", None, mean=1.0) | {"t": None}
    early = entry("v3", "json:/score", None) | {"n": 40, "tau": None}
    empty = entry("v3", "json:/score", None) | {"n": 0}
    verdicts([zero_spread, early, empty])
    assert zero_spread["verdict"] == "every pair differs by +1 (no spread: no test)"
    assert str(early["verdict"]).startswith("not enough pairs yet: the always-valid test starts")
    assert empty["verdict"] == "not enough pairs yet"


def test_an_agreement_entry_is_a_rate_without_a_test() -> None:
    stats = ShadowStats("agreement")
    for d in [0.0] * 95 + [-1.0] * 5:
        stats.add(d)
    report = stats.report("v3")
    verdicts([report])
    assert report["agreement"]["k"] == 95 and report["agreement"]["n"] == 100
    assert report["t"] is None and report["p_always_valid"] is None and report["wilcoxon"] is None
    assert report["verdict"] == "agrees on 95.0% of pairs (95 % CI 88.8% to 97.8%)"


def test_a_report_with_an_mde_tests_from_the_second_pair() -> None:
    stats = ShadowStats("json:/score", mde=0.05)
    for d in (0.1, 0.12, 0.09, 0.11):
        stats.add(d)
    report = stats.report("v3")
    assert report["tau"] == 0.05 and report["p_always_valid"] is not None
    low, high = report["cs95"]
    assert low < report["mean_diff"] < high and math.isfinite(low)
    assert report["wilcoxon"] == {"pairs": 4, "p": None, "pairs_from": "replica"}
    assert RunningStats.of([0.1, 0.12, 0.09, 0.11]) == stats.total
