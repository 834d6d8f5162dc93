"""The request path's guard (`control.guard.CanaryGuard`, DESIGN 5): alpha spent over the rollout,
the current test's decision, relative mode, and the guarantees by seeded simulation through the
guard itself."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import gateway.control.guard
from gateway.control.guard import CanaryGuard
from gateway.core.flags import Guard
from gateway.core.sprt import Decision, wald_rejection_bound
from gateway.flagstore import MemoryStore
from gateway.flagstore.base import GuardState

FIXED = settings(derandomize=True, deadline=None, max_examples=40)
LN5 = math.log(5)  # one error's llr step at the defaults (e1/e0 = 5)


class Recorder:
    def __init__(self) -> None:
        self.rejected = 0
        self.accepted = 0

    def reject(self, _: CanaryGuard) -> None:
        self.rejected += 1

    def accept(self, _: CanaryGuard) -> None:
        self.accepted += 1


def new_guard(**config: Any) -> tuple[CanaryGuard, Recorder]:
    seen = Recorder()
    guard = CanaryGuard("f", Guard(**config), on_reject=seen.reject, on_accept=seen.accept)
    guard.restart(GuardState(rollout="R1"))
    return guard, seen


def errors_to_reject(test: int, alpha: float = 0.01) -> int:
    """Consecutive errors that take a fresh test i to llr >= A_i at e1/e0 = 5."""
    return math.ceil(math.log(test * (test + 1) / alpha) / LN5 - 1e-12)


# --- alpha spending -----------------------------------------------------------------------


@FIXED
@given(restarts=st.integers(0, 60))
def test_a_test_restarted_i_times_is_judged_against_a_i(restarts: int) -> None:
    guard, seen = new_guard()
    for i in range(1, restarts + 1):
        assert guard.test == i
        assert pytest.approx(math.log(i * (i + 1) / 0.01), abs=1e-12) == guard.A
        for _ in range(56):  # 56 clean responses accept at the defaults
            guard.observe(False)
        assert seen.accepted == i
    test = restarts + 1
    assert (guard.test, guard.accepts) == (test, restarts)
    assert pytest.approx(math.log(test * (test + 1) / 0.01), abs=1e-12) == guard.A
    needed = errors_to_reject(test)
    for _ in range(needed - 1):
        guard.observe(True)
    assert seen.rejected == 0, f"rejected before llr reached A_{test}"
    guard.observe(True)
    assert seen.rejected == 1 and guard.tripped
    assert guard.llr >= guard.A


def test_four_errors_reject_tests_one_and_two_and_three_do_not() -> None:
    guard, seen = new_guard()
    for _ in range(3):
        guard.observe(True)
    assert (seen.rejected, guard.decision) == (0, Decision.CONTINUE)
    guard.observe(True)
    assert (seen.rejected, guard.decision) == (1, Decision.REJECT)
    assert (errors_to_reject(1), errors_to_reject(2), errors_to_reject(3)) == (4, 4, 5)


def test_decision_is_the_current_tests_and_status_carries_the_spending() -> None:
    guard, _ = new_guard()
    for _ in range(56):
        guard.observe(False)
    status = guard.status()
    assert status["decision"] == "accept"  # at the moment of acceptance
    assert (status["test"], status["accepts"], status["n"], status["k"]) == (2, 1, 0, 0)
    assert status["A"] == round(math.log(600), 6) and status["B"] == round(guard.B, 6)
    assert status["alpha"] == 0.01
    assert status["alpha_spent"] == pytest.approx(0.01 * (1 - 1 / 3))
    guard.observe(True)
    guard.observe(True)
    status = guard.status()
    # Not "accept" any more, even though test 1 accepted: test 2 is undecided at n = k = 2.
    assert (status["decision"], status["n"], status["k"]) == ("continue", 2, 2)
    assert "ratio" not in status


def test_a_new_rollout_starts_again_at_test_one() -> None:
    guard, _ = new_guard()
    for _ in range(56 * 3):
        guard.observe(False)
    assert guard.test == 4
    guard.restart(GuardState(rollout="R2"))
    assert (guard.test, guard.accepts, guard.n, guard.k) == (1, 0, 0, 0)
    assert pytest.approx(math.log(200)) == guard.A


def test_a_newer_test_from_the_store_is_adopted_and_an_older_one_ignored() -> None:
    guard, _ = new_guard()
    guard.observe(True)
    guard.absorb(GuardState(rollout="R1", test=3, accepts=2, n=10, k=1))
    assert (guard.test, guard.accepts, guard.n, guard.k) == (3, 2, 10, 1)  # own test-1 count gone
    assert pytest.approx(math.log(12 / 0.01)) == guard.A
    guard.absorb(GuardState(rollout="R1", test=2, n=99, k=9))  # late: ignored
    guard.absorb(GuardState(rollout="R0", test=7, n=99, k=9))  # another rollout: ignored
    assert (guard.test, guard.n, guard.k) == (3, 10, 1)


def test_an_unanswered_delta_goes_again_unchanged_before_anything_new() -> None:
    guard, _ = new_guard()
    for error in (False, True, False):
        guard.observe(error)
    first = guard.take_delta("r1")
    assert first is not None and (first.seq, first.n, first.k, first.test) == (1, 3, 1, 1)
    guard.observe(False)
    assert guard.n == 4  # the in-flight delta still counts in this replica's view
    assert guard.take_delta("r1") is first  # its reply was lost: the same delta again
    guard.delta_applied(GuardState(rollout="R1", n=3, k=1, canary_requests=3, canary_errors=1))
    second = guard.take_delta("r1")
    assert second is not None and (second.seq, second.n, second.k) == (2, 1, 0)


# --- guarantees by seeded simulation through CanaryGuard ------------------------------------

HORIZON = 100_000  # canary requests per simulated rollout
RUNS = 200  # rollouts; ~2 * 10^7 calls of CanaryGuard.observe
SEED = 20261204


def any_rollback_rate(
    new: Callable[[], tuple[CanaryGuard, Recorder]], e: float, runs: int, horizon: int, seed: int
) -> float:
    """The share of `runs` rollouts of `horizon` canary responses at error rate e that the
    guard rolled back, every response fed through `CanaryGuard.observe`."""
    rng = np.random.default_rng(seed)
    rolled_back = 0
    for _ in range(runs):
        guard, seen = new()
        observe = guard.observe
        for error in (rng.random(horizon) < e).tolist():
            observe(error)
            if seen.rejected:
                rolled_back += 1
                break
        guard.ends.clear()  # no flusher here; the ended tests would only pile up
    return rolled_back / runs


@pytest.mark.slow
def test_a_healthy_canary_is_rolled_back_over_100k_requests_at_most_alpha_of_the_time() -> None:
    # P <= alpha by Ville's inequality; measured against alpha + 3 standard errors of a
    # proportion at alpha over RUNS runs (alpha = 0.01, RUNS = 200: 0.01 + 0.021).
    alpha = 0.01
    rate = any_rollback_rate(new_guard, 0.01, RUNS, HORIZON, SEED)
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / RUNS)
    print(f"\nP(any rollback over {HORIZON} canary requests | e = e0) = {rate} ({RUNS} runs)")
    assert rate <= bound


@pytest.mark.slow
def test_the_same_simulation_fails_the_old_single_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: with A = ln((1 - beta)/alpha) for every test (the design this
    replaced) the same runs are rolled back almost always."""
    fixed = wald_rejection_bound(0.01, 0.10)
    monkeypatch.setattr(gateway.control.guard, "rejection_bound", lambda alpha, test: fixed)
    rate = any_rollback_rate(new_guard, 0.01, 50, HORIZON, SEED)
    print(f"\nold design: P(any rollback over {HORIZON} | e = e0) = {rate} (50 runs)")
    assert rate > 0.9


# --- relative mode -------------------------------------------------------------------------


def relative_rollback_rate(
    stable_e: float, canary_e: float, *, weight: float, runs: int, requests: int, seed: int
) -> tuple[float, CanaryGuard]:
    """Rollouts of `requests` requests, a share `weight` to the canary, fed through the guard."""
    rng = np.random.default_rng(seed)
    rolled_back = 0
    guard: CanaryGuard | None = None
    for _ in range(runs):
        guard, seen = new_guard(mode="relative")
        to_canary = (rng.random(requests) < weight).tolist()
        draws = rng.random(requests).tolist()
        observe, observe_stable = guard.observe, guard.observe_stable
        for canary, u in zip(to_canary, draws, strict=True):
            if canary:
                observe(u < canary_e)
            else:
                observe_stable(u < stable_e)
            if seen.rejected:
                rolled_back += 1
                break
        guard.ends.clear()
    assert guard is not None
    return rolled_back / runs, guard


@pytest.mark.slow
def test_relative_mode_with_equal_error_rates_rolls_back_at_most_alpha_of_the_time() -> None:
    runs, alpha = 200, 0.01
    rate, guard = relative_rollback_rate(
        0.01, 0.01, weight=0.2, runs=runs, requests=50_000, seed=SEED
    )
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)
    status = guard.status()
    print(f"\nrelative, both at 0.01, 50k requests: P(any rollback) = {rate}; last: {status}")
    assert rate <= bound
    assert status["q"] == pytest.approx(0.2, abs=0.02)  # the canary's share, as routed
    assert status["ratio"] == 2.0 and status["e0"] is None


def test_relative_mode_rolls_back_a_canary_at_five_times_stables_rate() -> None:
    rate, guard = relative_rollback_rate(
        0.01, 0.05, weight=0.2, runs=50, requests=50_000, seed=SEED
    )
    print(f"\nrelative, canary 0.05 vs stable 0.01: rolled back in {rate:.0%} of runs")
    assert rate == 1.0
    assert guard.decision is Decision.REJECT


def test_relative_mode_counts_stable_errors_against_the_canarys_share() -> None:
    guard, _ = new_guard(mode="relative", ratio=3)
    guard.observe(True)  # nothing counted before it: q unknown, not a trial
    assert (guard.n, guard.k, guard.llr) == (0, 0, 0.0)
    for _ in range(3):
        guard.observe_stable(False)
    # q = 1/4 before this error: a canary error adds ln 3 - ln(1 + 2/4).
    guard.observe(True)
    assert guard.llr == pytest.approx(math.log(3) - math.log(1.5))
    # q = 2/5 before this one: a stable error adds -ln(1 + 2 * 2/5).
    guard.observe_stable(True)
    assert guard.llr == pytest.approx(math.log(3) - math.log(1.5) - math.log(1.8))
    assert (guard.n, guard.k) == (2, 1)


# --- replicas sharing one store, replies lost at random (a hypothesis state machine) ------------


class FleetOnOneStore(RuleBasedStateMachine):
    """Three replicas' guards flush into one store the way `gateway.sync` does, and any reply
    may be lost (the store applied the delta, the replica does not know). Whatever the order:
    the store never counts a canary response twice, the test index is 1 + acceptances, and once
    every replica has flushed with its replies heard, the store holds every response exactly
    once and every replica judges the store's test."""

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore(None)
        self.guards = []
        for _ in range(3):
            guard, _ = new_guard()
            self.guards.append(guard)
        run(self.store.start_guard("f", rollout="R1"))
        self.observed = 0

    @rule(replica=st.integers(0, 2), errors=st.lists(st.booleans(), min_size=1, max_size=80))
    def serve(self, replica: int, errors: list[bool]) -> None:
        guard = self.guards[replica]
        for error in errors:
            if guard.tripped:
                return  # rolled back: this replica sends the canary nothing more
            guard.observe(error)
            self.observed += 1

    @rule(replica=st.integers(0, 2), lose_reply=st.booleans())
    def flush(self, replica: int, lose_reply: bool) -> None:
        flush(self.store, self.guards[replica], f"r{replica}", lose_reply=lose_reply)

    @rule()
    def settle(self) -> None:
        for _ in range(2):  # the second round brings every replica the others' last deltas
            for i, guard in enumerate(self.guards):
                flush(self.store, guard, f"r{i}", lose_reply=False)
        state = run(self.store.guard_state("f"))
        assert state.canary_requests == self.observed
        for guard in self.guards:
            assert (guard.test, guard.accepts) == (state.test, state.accepts)
            assert guard.inflight is None and not guard.ends

    @invariant()
    def never_counted_twice(self) -> None:
        state = run(self.store.guard_state("f"))
        assert state.canary_requests <= self.observed
        assert state.test == 1 + state.accepts
        for guard in self.guards:
            assert guard.test <= state.test + len(guard.ends)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def flush(store: MemoryStore, guard: CanaryGuard, replica: str, *, lose_reply: bool) -> None:
    """`gateway.control.sync.CounterSync._flush_one`, with the delta's reply optionally lost."""
    while guard.ends:
        test, accepted, new_step = guard.ends[0]
        state = run(
            store.end_guard_test(
                "f", rollout=guard.rollout, test=test, accepted=accepted, new_step=new_step
            )
        )
        guard.ends.pop(0)
        guard.absorb(state)
    delta = guard.take_delta(replica)
    if delta is None:
        guard.absorb(run(store.guard_state("f")))
        return
    state = run(store.add_guard_delta("f", delta))
    if not lose_reply:
        guard.delta_applied(state)


TestFleetOnOneStore = FleetOnOneStore.TestCase
TestFleetOnOneStore.settings = settings(
    derandomize=True, deadline=None, max_examples=60, stateful_step_count=30
)
