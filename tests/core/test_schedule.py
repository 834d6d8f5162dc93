"""Rollout schedules (DESIGN 4): known answers, catch-up, evidence gates, pauses and properties.

No wall clock: every test passes `now` explicitly. Hypothesis runs derandomized (fixed seed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.flags import ExponentialSchedule, Step, StepSchedule
from gateway.core.schedule import (
    Phase,
    Rollout,
    advance,
    full_traffic_at,
    next_change_at,
    pause,
    promote,
    record_evidence,
    resume,
    roll_back,
    running_time,
    start,
    total_duration,
    weight,
)

FIXED = settings(derandomize=True, database=None, max_examples=100, deadline=None)
T0 = 1_000_000.0  # wall clock at which the rollouts under test start

# DESIGN 2's ramp: steps start at running 0, 300, 1200 and 3000 s; promotion at 3600 s.
RAMP = StepSchedule(
    steps=[
        Step(weight=0.01, hold=300.0),
        Step(weight=0.05, hold=900.0),
        Step(weight=0.25, hold=1800.0),
        Step(weight=1.0, hold=600.0),
    ]
)


def exponential(
    p0: float = 0.01, rate: float = 0.1 / 3600, hold: float = 600.0
) -> ExponentialSchedule:
    return ExponentialSchedule(kind="exponential", p0=p0, rate=rate, hold_at_full=hold)


def expected_ramp(p0: float, rate: float, t: float) -> float:
    """DESIGN 4's formula, with math.exp's overflow read as "far past full traffic"."""
    return 1.0 if rate * t > 700 else min(1.0, p0 * math.exp(rate * t))


def at(r: Rollout, now: float, *, evidence: bool = False, schedule: StepSchedule = RAMP) -> Rollout:
    return advance(schedule, r, now, requires_evidence=evidence)


step_schedules = st.lists(
    st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1000.0)), min_size=1, max_size=6
).map(
    lambda pairs: StepSchedule(
        steps=[
            Step(weight=w, hold=h)
            for w, (_, h) in zip(sorted(p[0] for p in pairs), pairs, strict=True)
        ]
    )
)
exponential_schedules = st.builds(
    exponential, st.floats(1e-6, 1.0), st.floats(1e-5, 1.0), st.floats(0.0, 1e4)
)


# --- step schedules ---------------------------------------------------------------------------


def test_step_weights_follow_steps_and_holds() -> None:
    r = start(T0)
    seen: dict[float, float] = {}
    for second in range(3700):  # a controller ticking once a second
        now = T0 + second
        r = at(r, now)
        w = weight(RAMP, r, now)
        if not seen or w != seen[max(seen)]:
            seen[second] = w
        if r.phase is Phase.PROMOTED:
            break
    assert seen == {0: 0.01, 300: 0.05, 1200: 0.25, 3000: 1.0}
    assert (second, r.changed_at, r.reason) == (3600, T0 + 3600, "schedule")


@pytest.mark.parametrize(
    ("t", "step", "w"),
    [(0, 0, 0.01), (299.5, 0, 0.01), (300, 1, 0.05), (1199.9, 1, 0.05), (1200, 2, 0.25),
     (2999, 2, 0.25), (3000, 3, 1.0), (3599.9, 3, 1.0)],
)  # fmt: skip
def test_step_known_answers(t: float, step: int, w: float) -> None:
    r = at(start(T0), T0 + t)
    assert (r.phase, r.step, weight(RAMP, r, T0 + t)) == (Phase.RUNNING, step, w)


def test_catch_up_over_several_steps_lands_on_schedule() -> None:
    r = at(start(T0), T0 + 3100)  # a controller that was down since the start
    assert (r.step, r.step_started, r.changed_at, r.reason) == (3, 3000.0, T0 + 3000, "schedule")
    assert weight(RAMP, r, T0 + 3100) == 1.0
    ticked = start(T0)
    for now in (T0 + 10, T0 + 700, T0 + 2000, T0 + 3100):
        ticked = at(ticked, now)
    assert ticked == r


def test_promoted_after_last_hold_even_after_a_long_gap() -> None:
    assert at(start(T0), T0 + 3599.5).phase is Phase.RUNNING
    r = at(start(T0), T0 + 1e6)
    assert (r.phase, r.reason, r.changed_at, r.step) == (Phase.PROMOTED, "schedule", T0 + 3600, 3)
    assert weight(RAMP, r, T0 + 1e6) == 1.0
    assert at(r, T0 + 2e6) is r
    assert next_change_at(RAMP, r, T0 + 2e6, requires_evidence=False) is None


def test_nothing_due_returns_the_same_object() -> None:
    r = start(T0)
    assert at(r, T0 + 299.9) is r
    assert at(r, T0 - 50.0) is r  # a replica whose clock lags the starter's


def test_evidence_gate_holds_the_step_until_evidence_then_leaves_at_once() -> None:
    r = start(T0)
    assert at(r, T0 + 400, evidence=True) is r
    assert weight(RAMP, r, T0 + 400) == 0.01
    assert next_change_at(RAMP, r, T0 + 400, requires_evidence=True) is None
    r = at(record_evidence(r), T0 + 400, evidence=True)
    # The evidence came after the hold: the next step starts now and gets its full hold.
    assert (r.step, r.step_started, r.evidence, r.changed_at) == (1, 400.0, False, T0 + 400)
    assert next_change_at(RAMP, r, T0 + 400, requires_evidence=True) == T0 + 1300


def test_evidence_before_the_hold_ends_still_waits_for_the_hold() -> None:
    r = record_evidence(start(T0))
    assert at(r, T0 + 10, evidence=True) is r
    assert at(r, T0 + 299.9, evidence=True) is r
    r = at(r, T0 + 300, evidence=True)
    assert (r.step, r.step_started, r.evidence) == (1, 300.0, False)


def test_catch_up_never_skips_an_evidence_gate() -> None:
    r = at(record_evidence(start(T0)), T0 + 1e5, evidence=True)
    assert (r.phase, r.step, r.evidence) == (Phase.RUNNING, 1, False)
    assert at(r, T0 + 1e5, evidence=True) is r
    # Each later step gets its full hold from the moment it began, evidence or not.
    r = record_evidence(r)
    assert at(r, T0 + 1e5 + 899, evidence=True) is r
    r = at(r, T0 + 1e5 + 900, evidence=True)
    assert (r.step, r.step_started, r.evidence) == (2, 1e5 + 900, False)
    r = at(record_evidence(r), T0 + 1.5e5, evidence=True)
    assert (r.step, r.evidence) == (3, False)
    r = at(r, T0 + 2e5, evidence=True)
    assert r.phase is Phase.RUNNING  # the last step needs its evidence too
    r = at(record_evidence(r), T0 + 2e5, evidence=True)
    assert (r.phase, r.changed_at) == (Phase.PROMOTED, T0 + 2e5)


def test_evidence_resets_on_each_new_step_even_without_a_gate() -> None:
    r = record_evidence(start(T0))
    assert r.evidence
    r = at(r, T0 + 300)
    assert (r.step, r.evidence) == (1, False)
    marked = record_evidence(r)
    assert record_evidence(marked) is marked


@pytest.mark.parametrize(
    ("steps", "full", "total"),
    [
        ([(0.01, 300), (0.05, 900), (0.25, 1800), (1.0, 600)], 3000.0, 3600.0),
        ([(0.5, 60), (1.0, 60), (1.0, 60)], 60.0, 180.0),
        ([(0.75, 60), (1.0, 30)], 60.0, 90.0),
        ([(1.0, 0)], 0.0, 0.0),
        ([(0.1, 60), (0.5, 60)], None, 120.0),  # never full before the promotion
    ],
)
def test_step_full_traffic_and_total_duration(
    steps: list[tuple[float, float]], full: float | None, total: float
) -> None:
    schedule = StepSchedule(steps=[Step(weight=w, hold=h) for w, h in steps])
    assert (full_traffic_at(schedule), total_duration(schedule)) == (full, total)


def test_step_next_change_at() -> None:
    r = start(T0)
    assert next_change_at(RAMP, r, T0 + 5, requires_evidence=False) == T0 + 300
    assert next_change_at(RAMP, r, T0 + 5, requires_evidence=True) == T0 + 300
    assert next_change_at(RAMP, r, T0 + 301, requires_evidence=False) == T0 + 300  # overdue
    r = at(r, T0 + 1300)
    assert next_change_at(RAMP, r, T0 + 1300, requires_evidence=False) == T0 + 3000


def test_a_step_beyond_the_schedule_holds_at_the_last_step() -> None:
    r = Rollout(phase=Phase.RUNNING, started_at=T0, step=9, step_started=3000.0)
    assert weight(RAMP, r, T0 + 3100) == 1.0
    assert at(r, T0 + 3600).phase is Phase.PROMOTED


# --- exponential schedules --------------------------------------------------------------------


@FIXED
@given(st.floats(1e-9, 1.0), st.floats(1e-6, 10.0), st.floats(0.0, 1e7))
def test_exponential_weight_is_the_formula(p0: float, rate: float, t: float) -> None:
    w = weight(exponential(p0, rate), start(0.0), t)
    assert w == pytest.approx(expected_ramp(p0, rate, t), abs=1e-12)
    assert 0.0 < w <= 1.0


def test_exponential_known_answers() -> None:
    s = exponential()  # p0 = 1 %, rate 0.1/h
    assert weight(s, start(T0), T0 + 3600) == pytest.approx(0.01 * math.e**0.1, abs=1e-15)
    assert full_traffic_at(s) == pytest.approx(math.log(100) * 36000, rel=1e-12)  # ~46 h
    assert total_duration(s) == pytest.approx(math.log(100) * 36000 + 600, rel=1e-12)


@FIXED
@given(st.floats(1e-6, 0.99), st.floats(1e-6, 10.0))
def test_exponential_reaches_exactly_one_at_full_traffic(p0: float, rate: float) -> None:
    s = exponential(p0, rate)
    full = full_traffic_at(s)
    assert full is not None
    assert full == pytest.approx(math.log(1 / p0) / rate, rel=1e-12)
    r = start(0.0)
    assert weight(s, r, full) == 1.0
    assert weight(s, r, full * 2) == 1.0
    assert weight(s, r, full * (1 - 1e-6)) < 1.0


@FIXED
@given(st.floats(1e-6, 0.99), st.floats(1e-6, 10.0), st.floats(1.0, 1e5))
def test_exponential_promoted_hold_at_full_after_full_traffic(
    p0: float, rate: float, hold: float
) -> None:
    s = exponential(p0, rate, hold)
    done, full = total_duration(s), full_traffic_at(s)
    assert full is not None
    assert done == full + hold
    # next_change_at: T* while ramping, then the promotion.
    assert next_change_at(s, start(0.0), full / 2, requires_evidence=False) == full
    assert next_change_at(s, start(0.0), done - 0.5, requires_evidence=False) == done
    assert advance(s, start(0.0), done - 0.5, requires_evidence=True).phase is Phase.RUNNING
    r = advance(s, start(0.0), done, requires_evidence=True)  # no evidence gate on a ramp
    assert (r.phase, r.reason, r.changed_at) == (Phase.PROMOTED, "schedule", done)


def test_exponential_with_p0_one_is_full_at_once() -> None:
    s = exponential(p0=1.0, hold=60.0)
    assert (full_traffic_at(s), total_duration(s)) == (0.0, 60.0)
    assert weight(s, start(T0), T0) == 1.0
    assert next_change_at(s, start(T0), T0, requires_evidence=False) == T0 + 60


def test_exponential_with_a_subnormal_p0_does_not_overflow() -> None:
    s = exponential(p0=1e-320, rate=1.0)  # T* ~ 737 s, past math.exp's limit of ~709.8
    expected = math.exp(math.log(1e-320) + 720.0)
    assert weight(s, start(0.0), 720.0) == pytest.approx(expected, rel=1e-9)
    assert weight(s, start(0.0), 736.0) < 1.0 == weight(s, start(0.0), 737.0)


# --- pause and resume -------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [RAMP, exponential(rate=0.001)], ids=["step", "exponential"])
def test_pause_freezes_weight_and_clock(schedule: StepSchedule | ExponentialSchedule) -> None:
    r = pause(start(T0), T0 + 1000)
    frozen = weight(schedule, start(T0), T0 + 1000)
    for now in (T0 + 1000, T0 + 5000, T0 + 1e7):
        assert (running_time(r, now), weight(schedule, r, now)) == (1000.0, frozen)
        assert advance(schedule, r, now, requires_evidence=False) is r
        assert next_change_at(schedule, r, now, requires_evidence=False) is None
    assert (r.phase, r.reason, r.changed_at) == (Phase.PAUSED, "operator", T0 + 1000)
    assert record_evidence(r) is r


def test_resume_continues_where_it_was_paused() -> None:
    r = resume(pause(start(T0), T0 + 100), T0 + 1100)
    assert (r.phase, r.paused_total, r.paused_since) == (Phase.RUNNING, 1000.0, None)
    assert running_time(r, T0 + 1100) == 100.0
    assert next_change_at(RAMP, r, T0 + 1100, requires_evidence=False) == T0 + 1300
    assert at(r, T0 + 1299.9).step == 0
    assert at(r, T0 + 1300).step == 1
    assert at(r, T0 + 4599.9).phase is Phase.RUNNING
    assert at(r, T0 + 4600).changed_at == T0 + 4600  # exactly the paused time later


@FIXED
@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 10_000)), min_size=1, max_size=5))
def test_several_pauses_add_up(cycles: list[tuple[int, int]]) -> None:
    r, now = start(T0), T0
    for run, paused in cycles:
        now += run
        r = pause(r, now)
        now += paused
        r = resume(r, now)
    total_paused = sum(p for _, p in cycles)
    assert r.paused_total == total_paused
    promoted_at = T0 + 3600 + total_paused
    assert at(r, promoted_at - 0.5).phase is Phase.RUNNING
    assert at(r, promoted_at).phase is Phase.PROMOTED
    s, plain = exponential(rate=0.001), start(T0)
    assert weight(s, r, now + 77) == weight(s, plain, now + 77 - total_paused)


def test_a_lagging_clock_never_makes_time_negative() -> None:
    r = pause(start(T0), T0 + 100)
    assert resume(r, T0 + 50).paused_total == 0.0
    assert running_time(start(T0), T0 - 10) == 0.0


# --- properties over both kinds ---------------------------------------------------------------


@FIXED
@given(
    st.one_of(step_schedules, exponential_schedules),
    st.lists(st.tuples(st.floats(0.0, 5000.0), st.booleans()), max_size=30),
    st.booleans(),
)
def test_weight_never_decreases_while_running(
    schedule: StepSchedule | ExponentialSchedule,
    ticks: list[tuple[float, bool]],
    requires_evidence: bool,
) -> None:
    r, now = start(T0), T0
    last_w, last_t = weight(schedule, r, now), 0.0
    for dt, evidence in ticks:
        now += dt
        r = record_evidence(r) if evidence else r
        r = advance(schedule, r, now, requires_evidence=requires_evidence)
        w, t = weight(schedule, r, now), running_time(r, now)
        assert 0.0 <= last_w <= w <= 1.0
        assert last_t <= t
        last_w, last_t = w, t


@FIXED
@given(step_schedules, st.lists(st.floats(0.0, 2000.0), min_size=1, max_size=10))
def test_catch_up_in_one_call_equals_ticking(schedule: StepSchedule, gaps: list[float]) -> None:
    ticked, now = start(T0), T0
    for gap in gaps:
        now += gap
        ticked = advance(schedule, ticked, now, requires_evidence=False)
    assert advance(schedule, start(T0), now, requires_evidence=False) == ticked


# --- rollback, promotion and illegal transitions ----------------------------------------------


def test_rolled_back_means_weight_zero_and_nothing_moves() -> None:
    r = roll_back(at(start(T0), T0 + 400), T0 + 500, "sprt")
    assert (r.phase, r.reason, r.changed_at) == (Phase.ROLLED_BACK, "sprt", T0 + 500)
    for schedule in (RAMP, exponential(p0=1.0)):
        for now in (T0 + 500, T0 + 1e7):
            assert weight(schedule, r, now) == 0.0
            assert advance(schedule, r, now, requires_evidence=False) is r
            assert next_change_at(schedule, r, now, requires_evidence=False) is None
    assert record_evidence(r) is r
    assert running_time(r, T0 + 1e7) == 500.0
    assert start(T0 + 600) == Rollout(Phase.RUNNING, T0 + 600, reason="start", changed_at=T0 + 600)


def test_roll_back_and_promote_from_paused_fold_the_pause() -> None:
    paused = pause(start(T0), T0 + 100)
    back = roll_back(paused, T0 + 700, "operator")
    assert (back.paused_total, back.paused_since, running_time(back, T0 + 9e9)) == (600, None, 100)
    up = promote(paused, T0 + 700, "operator")
    assert (up.phase, up.reason, weight(RAMP, up, T0 + 700)) == (Phase.PROMOTED, "operator", 1.0)


Transition = Callable[[Rollout], Rollout]
PAUSE: Transition = lambda r: pause(r, T0 + 1)  # noqa: E731
RESUME: Transition = lambda r: resume(r, T0 + 1)  # noqa: E731
ROLL_BACK: Transition = lambda r: roll_back(r, T0 + 1, "operator")  # noqa: E731
PROMOTE: Transition = lambda r: promote(r, T0 + 1, "operator")  # noqa: E731
RUNNING = start(T0)
PAUSED = pause(RUNNING, T0)
ROLLED_BACK = roll_back(RUNNING, T0, "sprt")
PROMOTED = promote(RUNNING, T0, "operator")


@pytest.mark.parametrize(
    ("transition", "r", "message"),
    [
        (RESUME, RUNNING, "cannot resume a rollout that is running"),
        (PAUSE, PAUSED, "cannot pause a rollout that is paused"),
        (PAUSE, ROLLED_BACK, "cannot pause a rollout that is rolled_back"),
        (RESUME, ROLLED_BACK, "cannot resume"),
        (ROLL_BACK, ROLLED_BACK, "cannot roll back a rollout that is rolled_back"),
        (PROMOTE, ROLLED_BACK, "cannot promote"),
        (PAUSE, PROMOTED, "cannot pause"),
        (RESUME, PROMOTED, "cannot resume"),
        (PROMOTE, PROMOTED, "cannot promote a rollout that is promoted"),
    ],
)
def test_illegal_transitions_raise(transition: Transition, r: Rollout, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        transition(r)


def test_a_promoted_canary_not_yet_retired_can_still_be_rolled_back() -> None:
    back = ROLL_BACK(PROMOTED)
    assert (back.phase, back.reason, weight(RAMP, back, T0 + 5)) == (
        Phase.ROLLED_BACK,
        "operator",
        0.0,
    )


# --- persistence ------------------------------------------------------------------------------

finite = st.floats(-1e12, 1e12)
non_negative = st.floats(0.0, 1e9)


@st.composite
def rollouts(draw: st.DrawFn) -> Rollout:
    phase = draw(st.sampled_from(Phase))
    return Rollout(
        phase=phase,
        started_at=draw(finite),
        paused_total=draw(non_negative),
        paused_since=draw(finite) if phase is Phase.PAUSED else None,
        step=draw(st.integers(0, 50)),
        step_started=draw(non_negative),
        evidence=draw(st.booleans()),
        reason=draw(st.text(max_size=20)),
        changed_at=draw(finite),
    )


@FIXED
@given(rollouts())
def test_to_dict_from_dict_round_trip(r: Rollout) -> None:
    doc = r.to_dict()
    assert doc["phase"] == r.phase.value
    assert type(doc["phase"]) is str
    assert Rollout.from_dict(doc) == r
    assert Rollout.from_dict(json.loads(json.dumps(doc))) == r


def test_from_dict_defaults_and_ignores_unknown_keys() -> None:
    r = Rollout.from_dict({"phase": "running", "started_at": 5, "owner": "replica-2"})
    assert r == Rollout(Phase.RUNNING, 5.0)
    assert type(r.started_at) is float


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"phase": "exploded"}, "phase must be one of running, paused, rolled_back, promoted"),
        ({"phase": 1}, "phase must be one of"),
        ({"started_at": "1000"}, "started_at must be a number"),
        ({"started_at": True}, "started_at must be a number"),
        ({"started_at": float("nan")}, "started_at must be a finite"),
        ({"paused_total": -1.0}, "paused_total and step_started must be >= 0"),
        ({"step": "1"}, "step must be an integer"),
        ({"step": 1.0}, "step must be an integer"),
        ({"step": -1}, "step must be an integer >= 0"),
        ({"evidence": "yes"}, "evidence must be true or false"),
        ({"reason": None}, "reason must be a string"),
        ({"changed_at": 10**400}, "changed_at is out of range"),
        ({"phase": "paused"}, "paused_since must be set exactly when the phase is paused"),
        ({"paused_since": 3.0}, "paused_since must be set exactly when the phase is paused"),
    ],
)
def test_from_dict_rejects_bad_values(change: dict[str, object], message: str) -> None:
    doc = {**start(T0).to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        Rollout.from_dict(doc)


def test_from_dict_rejects_missing_keys_and_non_mappings() -> None:
    with pytest.raises(ValueError, match="missing 'started_at'"):
        Rollout.from_dict({"phase": "running"})
    with pytest.raises(ValueError, match="must be a mapping"):
        Rollout.from_dict(["running", 0.0])  # type: ignore[arg-type]


def test_phase_values_are_the_contract() -> None:
    assert [p.value for p in Phase] == ["running", "paused", "rolled_back", "promoted"]
    assert isinstance(Phase.RUNNING, str)
    assert f"{Phase.ROLLED_BACK}" == "rolled_back"
    assert Phase("paused") is Phase.PAUSED
