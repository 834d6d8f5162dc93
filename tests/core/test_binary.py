"""Agreement rates (Wilson) and McNemar's test on error pairs (DESIGN 6), scipy as the oracle."""

from __future__ import annotations

import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.binary import agreement_rate, discordant, mcnemar, wilson
from gateway.core.paired import RunningStats

FIXED = settings(derandomize=True, deadline=None)


@FIXED
@given(data=st.data(), n=st.integers(1, 5000))
def test_wilson_equals_scipy_and_stays_inside_0_1(data: st.DataObject, n: int) -> None:
    k = data.draw(st.integers(0, n))
    rate = wilson(k, n)
    assert rate is not None
    oracle = scipy.stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert rate.wilson95[0] == pytest.approx(oracle.low, abs=1e-12)
    assert rate.wilson95[1] == pytest.approx(oracle.high, abs=1e-12)
    assert 0.0 <= rate.wilson95[0] <= rate.rate <= rate.wilson95[1] <= 1.0


def test_wilson_edges() -> None:
    assert wilson(0, 0) is None
    everything = wilson(50, 50)
    assert everything is not None and everything.wilson95[1] == 1.0
    assert everything.wilson95[0] == pytest.approx(0.9287, abs=1e-4)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(3, 2)


@FIXED
@given(agree=st.lists(st.booleans(), min_size=1, max_size=300))
def test_the_agreement_rate_comes_from_the_running_stats_of_d(agree: list[bool]) -> None:
    # d = m(shadow) - m(primary) = 0 when the shadow agreed, -1 when not
    rate = agreement_rate(RunningStats.of(0.0 if a else -1.0 for a in agree))
    assert rate is not None
    assert (rate.k, rate.n) == (sum(agree), len(agree))


@FIXED
@given(pairs=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=400))
def test_mcnemar_equals_binomtest_on_the_discordant_pairs(pairs: list[tuple[bool, bool]]) -> None:
    # (primary failed, shadow failed); d = shadow - primary
    stats = RunningStats.of(float(s) - float(p) for p, s in pairs)
    b = sum(1 for p, s in pairs if s and not p)
    c = sum(1 for p, s in pairs if p and not s)
    assert discordant(stats) == (b, c)
    result = mcnemar(b, c)
    if b + c == 0:
        assert result is None
        return
    assert result is not None
    assert result.p == pytest.approx(scipy.stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    assert result.as_dict() == {"shadow_only": b, "primary_only": c, "p": result.p}
