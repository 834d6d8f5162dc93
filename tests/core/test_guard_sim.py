"""bench/guard_sim.py: its SPRT path is the gateway's own, its fixed checks fire by their rules."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from gateway.core import sprt
from gateway.core.sprt import Decision, SprtBounds, SprtCounts, step


def load_guard_sim() -> ModuleType:
    # bench/ is a folder of scripts, not a package: load the file itself.
    path = Path(__file__).resolve().parents[2] / "bench" / "guard_sim.py"
    spec = importlib.util.spec_from_file_location("guard_sim", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


guard_sim = load_guard_sim()

PER_MINUTE = 1000  # requests per minute in the hand-built sequences
FAIL, PASS = 51, 50  # errors per minute: 5.1 % fails, exactly 5 % does not


def direct_count(bounds: SprtBounds, gaps: list[int]) -> tuple[list[int], int]:
    """Rollbacks (as error indices) and ACCEPTs, feeding every single response to `step` with
    the current test index (1 + ACCEPTs since the last rollback)."""
    counts, rollbacks, accepts, error_index, test = SprtCounts(), [], 0, -1, 1
    for clean in gaps:
        for error in [False] * clean + [True]:
            error_index += error
            counts, verdict = step(bounds, counts, error, test)
            if verdict.decision is Decision.ACCEPT:
                accepts += 1
                test += 1
            elif verdict.decision is Decision.REJECT:
                rollbacks.append(error_index)
                counts, test = SprtCounts(), 1
    return rollbacks, accepts


def test_the_simulation_judges_with_the_gateways_sprt() -> None:
    bounds = guard_sim.GUARD
    assert guard_sim.step is sprt.step
    assert type(bounds) is sprt.SprtBounds
    assert bounds == SprtBounds(e0=0.01, e1=0.05, alpha=0.01, beta=0.10)
    assert math.isclose(bounds.A, math.log(200))  # DESIGN 5: A_1 = ln 200
    assert math.isclose(guard_sim.OLD_A, math.log(90))  # the old design's single bound


@pytest.mark.parametrize(
    "bounds",
    [guard_sim.GUARD, SprtBounds(e0=0.02, e1=0.04, alpha=0.05, beta=0.2)],
    ids=["defaults", "narrow"],
)
def test_the_skipping_scan_equals_a_direct_count(bounds: SprtBounds) -> None:
    rng = np.random.default_rng(7)
    traffic = guard_sim.draw_traffic(rng, 5.0, minutes=60, change_min=30, errors=(0.01, 0.05))
    rollbacks, accepts = guard_sim.guard_scan(bounds, traffic.gaps)
    assert (rollbacks, accepts) == direct_count(bounds, traffic.gaps.tolist())
    assert len(rollbacks) >= 3 and accepts >= 50  # the case exercises both decisions
    first_late = next(i for i in rollbacks if i >= 100)
    stopped, _ = guard_sim.guard_scan(bounds, traffic.gaps, stop_from=100)
    assert stopped == [i for i in rollbacks if i <= first_late]


def test_traffic_counts_agree() -> None:
    traffic = guard_sim.draw_traffic(
        np.random.default_rng(3), 20.0, minutes=30, change_min=10, errors=(0.005, 0.05)
    )
    assert traffic.error_ordinals.tolist() == np.cumsum(traffic.gaps + 1).tolist()
    assert traffic.errors_before[-1] == traffic.error_times.size
    assert np.all(np.diff(traffic.served_before) >= np.diff(traffic.errors_before))
    assert traffic.served_before[-1] >= traffic.error_ordinals[-1]


def minutes(errors: list[int]) -> Any:  # a guard_sim.Traffic
    """A hand-built run: PER_MINUTE requests each minute, `errors` of them errors."""
    served = np.arange(len(errors) + 1, dtype=np.int64) * PER_MINUTE
    return guard_sim.Traffic(
        error_times=np.zeros(0),
        gaps=np.zeros(0, dtype=np.int64),
        error_ordinals=np.zeros(0, dtype=np.int64),
        served_before=served,
        errors_before=np.concatenate([[0], np.cumsum(errors)]),
    )


def rollback_minutes(check: Any, errors: list[int]) -> list[float]:
    """The minutes at which `check` (a guard_sim.FixedCheck) rolls back the hand-built run."""
    return [float(t) / 60 for t in guard_sim.check_rollbacks(check, minutes(errors)).times]


def test_flagger_counts_failures_without_reset_and_rolls_back_on_the_next_tick() -> None:
    # Checks fail at minutes 1, 3 and 5 (ticks); the tick at minute 6 rolls back.
    assert rollback_minutes(guard_sim.FLAGGER, [FAIL, PASS, FAIL, PASS, FAIL, PASS, PASS]) == [6]
    assert rollback_minutes(guard_sim.FLAGGER, [FAIL, FAIL, PASS]) == []
    assert rollback_minutes(guard_sim.FLAGGER, [PASS] * 30) == []  # exactly 5 % passes


def test_flagger_starts_afresh_after_a_rollback() -> None:
    # Failures at ticks 1-3, rollback at 4 (not a check); failures at 5-7, rollback at 8.
    assert rollback_minutes(guard_sim.FLAGGER, [FAIL] * 9) == [4, 8]
    served = guard_sim.check_rollbacks(guard_sim.FLAGGER, minutes([FAIL] * 9)).served
    assert served.tolist() == [4 * PER_MINUTE, 8 * PER_MINUTE]


def test_argo_fails_when_failed_measurements_exceed_the_failure_limit() -> None:
    failing, passing = [FAIL] + [PASS] * 4, [PASS] * 5  # 251 / 5000 and 250 / 5000
    three = failing + passing + failing + failing + passing * 4
    assert rollback_minutes(guard_sim.ARGO, three) == []  # failed (3) > failureLimit (3)? no
    four = failing + passing + failing + failing + passing + passing + failing + passing
    assert rollback_minutes(guard_sim.ARGO, four) == [35]  # the 4th failure, at its own tick


def test_argo_judges_five_minutes_at_once() -> None:
    # Minute 1 alone is above 5 % (a Flagger failure) but the 5-minute window is exactly 5 %.
    window = [FAIL, PASS - 1, PASS, PASS, PASS]
    assert rollback_minutes(guard_sim.ARGO, window * 6) == []
    assert guard_sim.failed_checks(guard_sim.FLAGGER, minutes(window)).tolist()[0]


# --- the rollout-level figures (bench/guard_rollout.py) ------------------------------------

guard_rollout = sys.modules["guard_rollout"]


@pytest.mark.parametrize("test", [1, 2, 7, 1000])
def test_the_exact_thresholds_are_decides(test: int) -> None:
    bounds = guard_sim.GUARD
    a = bounds.a(test)
    for k in range(0, 40):
        m = guard_rollout.accept_clean(bounds, k)
        assert bounds.decide(k + m, k, test) is Decision.ACCEPT or (k, m) == (0, 0)
        if m > 0:
            assert bounds.decide(k + m - 1, k, test) is not Decision.ACCEPT
        cut = guard_rollout.reject_clean(bounds, a, k)
        if cut >= 0:
            assert bounds.decide(k + cut, k, test) is Decision.REJECT
        assert bounds.decide(k + cut + 1, k, test) is not Decision.REJECT


def test_a_tests_law_sums_to_one() -> None:
    bounds = guard_sim.GUARD
    for e in (0.005, 0.01, 0.05, 0.5):
        law = guard_rollout.law_of_test(bounds, bounds.a(1), e, 100_000)
        total = law.accept_p.sum() + law.reject_p.sum() + law.undecided
        assert total == pytest.approx(1.0, abs=1e-12), e


@pytest.mark.parametrize(("e", "horizon"), [(0.05, 400), (0.02, 2_000)])
def test_the_exact_rollback_probability_matches_canary_guard(e: float, horizon: int) -> None:
    """The dynamic programme against seeded runs of the request path's own CanaryGuard."""
    exact = guard_rollout.rollback_by(guard_sim.GUARD, e, (horizon,))[horizon]
    runs = 2_000
    measured = guard_rollout.any_rollback_share(guard_rollout.CanaryGuard, e, horizon, runs, 11)
    sigma = math.sqrt(exact * (1 - exact) / runs)
    print(f"\ne={e} N={horizon}: exact {exact:.4f}, CanaryGuard {measured:.4f} ({runs} runs)")
    assert abs(measured - exact) <= 4 * sigma
    fixed = guard_rollout.rollback_by(guard_sim.GUARD, e, (horizon,), fixed_a=guard_sim.OLD_A)
    old = guard_rollout.any_rollback_share(guard_rollout.FixedBoundGuard, e, horizon, runs, 11)
    assert abs(old - fixed[horizon]) <= 4 * math.sqrt(fixed[horizon] * (1 - fixed[horizon]) / runs)
