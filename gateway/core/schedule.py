"""Rollout schedules (DESIGN 4): a rollout's persisted state and the canary weight it implies.

This module owns `Rollout`, the runtime state of one flag's rollout (persisted apart from the
operator's flag document), and the pure functions that read and move it: `weight` (the canary
weight now), `advance` (every schedule transition due now), the operator and guard transitions
(`pause`, `resume`, `roll_back`, `promote`, `record_evidence`) and the look-ahead used by the
controller and the status document (`next_change_at`, `full_traffic_at`, `total_duration`).

Time: the caller passes `now`, wall-clock seconds. A rollout's clock is its *running time*,
`now - started_at - paused_total`, frozen while paused. Step positions are kept in running
seconds too (`step_started`), so every replica reading the same persisted state computes the same
weight, and a restarted gateway continues where it was.

Who calls what: the controller calls `advance` on a timer (sleeping until `next_change_at`) and
writes the result with compare-and-set; the request path calls `weight` on its snapshot. For a
step schedule `weight` reads the persisted step, so a step change shows once it is written (a
caller that cannot wait for that can use `weight(s, advance(s, r, now, ...), now)`); an
exponential weight moves with the clock on every replica by itself.

Evidence gating (`advance_requires_evidence`) applies to step schedules only: an exponential ramp
has no steps to hold back, so its `requires_evidence` argument is accepted and ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final, TypeAlias

from gateway.core.flags import ExponentialSchedule, StepSchedule

AnySchedule: TypeAlias = StepSchedule | ExponentialSchedule
JSONScalar: TypeAlias = str | float | int | bool | None

REASON_START: Final = "start"
REASON_SCHEDULE: Final = "schedule"
REASON_OPERATOR: Final = "operator"

# math.exp overflows just above 709.78; past this we take the log route (see _ramp_weight).
_MAX_EXP_ARG: Final = 700.0


class Phase(StrEnum):
    """Where a rollout is. ROLLED_BACK and PROMOTED are final until a new rollout is started.

    A `str` and an `Enum` (StrEnum rather than `(str, Enum)`, so that `str()` and f-strings give
    "running", not "Phase.RUNNING", in metric labels, logs and JSON).
    """

    RUNNING = "running"
    PAUSED = "paused"
    ROLLED_BACK = "rolled_back"
    PROMOTED = "promoted"


@dataclass(frozen=True, slots=True)
class Rollout:
    """The persisted runtime state of one flag's rollout.

    `started_at`, `paused_since` and `changed_at` are wall-clock seconds; `paused_total` and
    `step_started` are durations in seconds (`step_started` is the running time at which the
    current step began). `evidence` is true once the guard accepted H0 during the current step.
    `reason` says why the last transition happened ("start", "schedule", "operator", "sprt", ...).
    The constructor rejects inconsistent states with `ValueError`.
    """

    phase: Phase
    started_at: float
    paused_total: float = 0.0
    paused_since: float | None = None
    step: int = 0
    step_started: float = 0.0
    evidence: bool = False
    reason: str = ""
    changed_at: float = 0.0
    # What this rollout rolls out (canary upstream and schedule, as the controller fingerprints
    # them): a flag edit that changes it starts a new rollout; other edits keep this one.
    plan: str = ""

    def __post_init__(self) -> None:
        problem = _invariant_problem(self)
        if problem:
            raise ValueError(f"invalid rollout state: {problem}")

    def to_dict(self) -> dict[str, JSONScalar]:
        """A JSON-able document (phase as its string value) that `from_dict` reads back."""
        return {
            "phase": self.phase.value,
            "started_at": self.started_at,
            "paused_total": self.paused_total,
            "paused_since": self.paused_since,
            "step": self.step,
            "step_started": self.step_started,
            "evidence": self.evidence,
            "reason": self.reason,
            "changed_at": self.changed_at,
            "plan": self.plan,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Rollout:
        """Read a `to_dict` document; unknown keys are ignored, bad ones raise `ValueError`."""
        if not isinstance(data, Mapping):
            raise ValueError(f"rollout state must be a mapping, got {type(data).__name__}")
        paused_since = data.get("paused_since")
        return cls(
            phase=_phase(_required(data, "phase")),
            started_at=_number("started_at", _required(data, "started_at")),
            paused_total=_number("paused_total", data.get("paused_total", 0.0)),
            paused_since=None if paused_since is None else _number("paused_since", paused_since),
            step=_integer("step", data.get("step", 0)),
            step_started=_number("step_started", data.get("step_started", 0.0)),
            evidence=_boolean("evidence", data.get("evidence", False)),
            reason=_text("reason", data.get("reason", "")),
            changed_at=_number("changed_at", data.get("changed_at", 0.0)),
            plan=_text("plan", data.get("plan", "")),
        )


def _invariant_problem(r: Rollout) -> str | None:
    if not isinstance(r.phase, Phase):
        return f"phase must be a Phase, got {r.phase!r}"
    times = {"started_at": r.started_at, "paused_total": r.paused_total}
    times |= {"step_started": r.step_started, "changed_at": r.changed_at}
    if r.paused_since is not None:
        times["paused_since"] = r.paused_since
    for name, value in times.items():
        if not math.isfinite(value):
            return f"{name} must be a finite number of seconds, got {value!r}"
    if r.paused_total < 0 or r.step_started < 0:
        return "paused_total and step_started must be >= 0"
    if isinstance(r.step, bool) or not isinstance(r.step, int) or r.step < 0:
        return f"step must be an integer >= 0, got {r.step!r}"
    if (r.phase is Phase.PAUSED) != (r.paused_since is not None):
        return f"paused_since must be set exactly when the phase is paused ({r.phase.value})"
    return None


def _required(data: Mapping[str, object], key: str) -> object:
    if key not in data:
        raise ValueError(f"rollout state: missing {key!r}")
    return data[key]


def _phase(value: object) -> Phase:
    for phase in Phase:
        if isinstance(value, str) and value == phase.value:
            return phase
    allowed = ", ".join(p.value for p in Phase)
    raise ValueError(f"rollout state: phase must be one of {allowed}, got {value!r}")


def _number(key: str, value: object) -> float:
    # bool is an int subclass: `true` in a stored document is corruption, not the number 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"rollout state: {key} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"rollout state: {key} is out of range, got {value!r}") from None


def _integer(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"rollout state: {key} must be an integer, got {value!r}")
    return value


def _boolean(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"rollout state: {key} must be true or false, got {value!r}")
    return value


def _text(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"rollout state: {key} must be a string, got {value!r}")
    return value


def start(now: float, *, plan: str = "", reason: str = REASON_START) -> Rollout:
    """A new rollout of `plan`, running from `now` at the first step (or at p0)."""
    return Rollout(phase=Phase.RUNNING, started_at=now, reason=reason, changed_at=now, plan=plan)


def running_time(r: Rollout, now: float) -> float:
    """Seconds the rollout has run by `now`: time since its start minus the time spent paused.

    Frozen while paused (at the pause) and, once rolled back or promoted, at that transition.
    Never negative, so a replica whose clock lags the one that started the rollout reads 0.
    """
    if r.phase is Phase.RUNNING:
        clock = now
    elif r.phase is Phase.PAUSED:
        clock = now if r.paused_since is None else r.paused_since
    else:
        clock = r.changed_at
    return max(0.0, clock - r.started_at - r.paused_total)


def weight(schedule: AnySchedule, r: Rollout, now: float) -> float:
    """The canary weight at `now`: 0.0 rolled back, 1.0 promoted, frozen while paused.

    Step: the persisted step's weight (call `advance` to move on). Exponential:
    `min(1, p0 * exp(rate * t))` with t the running time.
    """
    if r.phase is Phase.ROLLED_BACK:
        return 0.0
    if r.phase is Phase.PROMOTED:
        return 1.0
    if isinstance(schedule, StepSchedule):
        return schedule.steps[_step_index(schedule, r)].weight
    return _ramp_weight(schedule, running_time(r, now))


def advance(schedule: AnySchedule, r: Rollout, now: float, *, requires_evidence: bool) -> Rollout:
    """Apply every schedule transition due at `now`; `r` itself when none is (or not running).

    A controller that was away catches up over several steps at once, each ending exactly on
    schedule, but never past an evidence gate: evidence belongs to one step and resets on the next.
    After the last step's hold (and evidence), or `hold_at_full` after T*, the rollout is
    promoted with reason "schedule". `changed_at` is when the transition was due, not `now`.
    `requires_evidence` is ignored for exponential schedules.
    """
    if r.phase is not Phase.RUNNING:
        return r
    t = running_time(r, now)
    if isinstance(schedule, StepSchedule):
        return _advance_steps(schedule, r, t, requires_evidence=requires_evidence)
    done = total_duration(schedule)
    return _promoted_by_schedule(r, _wall(r, done)) if t >= done else r


def _advance_steps(
    schedule: StepSchedule, r: Rollout, t: float, *, requires_evidence: bool
) -> Rollout:
    last = len(schedule.steps) - 1
    while True:
        i = _step_index(schedule, r)
        end = r.step_started + schedule.steps[i].hold
        if t < end or (requires_evidence and not r.evidence):
            return r
        # Evidence may have come after the hold ended, at a time we cannot know, so a gated step
        # ends now and the next one gets its full hold at the new weight. An ungated step ends
        # exactly on schedule, so a catch-up lands where an always-on controller would be.
        left = t if requires_evidence else end
        if i >= last:
            return _promoted_by_schedule(r, _wall(r, left))
        r = replace(
            r,
            step=i + 1,
            step_started=left,
            evidence=False,
            reason=REASON_SCHEDULE,
            changed_at=_wall(r, left),
        )


def _promoted_by_schedule(r: Rollout, at: float) -> Rollout:
    return replace(r, phase=Phase.PROMOTED, reason=REASON_SCHEDULE, changed_at=at)


def record_evidence(r: Rollout) -> Rollout:
    """The guard accepted H0 during the current step; `r` itself unless running."""
    if r.phase is not Phase.RUNNING or r.evidence:
        return r
    return replace(r, evidence=True)


def pause(r: Rollout, now: float) -> Rollout:
    """Freeze the weight and the rollout's clock; only a running rollout can be paused."""
    _require(r, "pause", Phase.RUNNING)
    return replace(r, phase=Phase.PAUSED, paused_since=now, reason=REASON_OPERATOR, changed_at=now)


def resume(r: Rollout, now: float) -> Rollout:
    """Run on from where the pause froze it; only a paused rollout can be resumed."""
    _require(r, "resume", Phase.PAUSED)
    return replace(_unpaused(r, now), reason=REASON_OPERATOR, changed_at=now)


def roll_back(r: Rollout, now: float, reason: str) -> Rollout:
    """Send the canary no traffic until a new rollout starts; from running, paused or promoted.

    Promoted: while the promoted document is not written yet, or was refused (DESIGN 4), the
    canary still serves at full weight, and the guard and the operator can still stop it.
    """
    _require(r, "roll back", Phase.RUNNING, Phase.PAUSED, Phase.PROMOTED)
    return replace(_unpaused(r, now), phase=Phase.ROLLED_BACK, reason=reason, changed_at=now)


def promote(r: Rollout, now: float, reason: str) -> Rollout:
    """Make the canary the stable variant now; from running or paused."""
    _require(r, "promote", Phase.RUNNING, Phase.PAUSED)
    return replace(_unpaused(r, now), phase=Phase.PROMOTED, reason=reason, changed_at=now)


def _unpaused(r: Rollout, now: float) -> Rollout:
    """`r` running again with its pause folded into `paused_total` (the clock stays frozen)."""
    if r.paused_since is None:
        return r
    # A replica whose clock lags the pauser's must not credit negative paused time.
    paused = max(0.0, now - r.paused_since)
    return replace(r, phase=Phase.RUNNING, paused_since=None, paused_total=r.paused_total + paused)


def _require(r: Rollout, action: str, *allowed: Phase) -> None:
    if r.phase not in allowed:
        names = " or ".join(p.value for p in allowed)
        raise ValueError(f"cannot {action} a rollout that is {r.phase.value} (only when {names})")


def next_change_at(
    schedule: AnySchedule, r: Rollout, now: float, *, requires_evidence: bool
) -> float | None:
    """Wall-clock time of the next transition if nothing else happens, or None.

    Step: the end of the current step's hold (even while evidence is still missing: it is the
    earliest the step can end); None once the hold is over and the step waits for evidence.
    Exponential: the weight changes continuously, so no instant is "the next change"; we return
    the time the ramp reaches full traffic (T*) while t < T*, then the promotion time.
    None when not running, or when the time is not finite. A value <= now means a transition is
    overdue: call `advance`. Right after `advance` the value is None or later than now.
    """
    if r.phase is not Phase.RUNNING:
        return None
    t = running_time(r, now)
    if isinstance(schedule, ExponentialSchedule):
        full = _time_at_full(schedule)
        due = full if t < full else full + schedule.hold_at_full
    else:
        due = r.step_started + schedule.steps[_step_index(schedule, r)].hold
        if t >= due and requires_evidence and not r.evidence:
            return None
    at = _wall(r, due)
    return at if math.isfinite(at) else None


def full_traffic_at(schedule: AnySchedule) -> float | None:
    """Running seconds until the weight first reaches 1.0, with no evidence waits.

    Exponential: T* = ln(1/p0) / rate. Step: the start of the first step at weight 1.0 (the last
    step, in a usual ramp); None when no step reaches 1.0, as then full traffic comes only with
    the promotion at `total_duration`.
    """
    if isinstance(schedule, ExponentialSchedule):
        return _time_at_full(schedule)
    t = 0.0
    for step in schedule.steps:
        if step.weight >= 1.0:
            return t
        t += step.hold
    return None


def total_duration(schedule: AnySchedule) -> float:
    """Running seconds from start to promotion, with no evidence waits."""
    if isinstance(schedule, ExponentialSchedule):
        return _time_at_full(schedule) + schedule.hold_at_full
    # Left to right from 0.0, as `advance` accumulates step_started (not fsum), so the two agree
    # to the last bit and a catch-up promotes exactly at this running time.
    return sum((step.hold for step in schedule.steps), 0.0)


def _time_at_full(schedule: ExponentialSchedule) -> float:
    # -ln(p0) rather than ln(1/p0): 1/p0 overflows for a subnormal p0. abs() turns p0 = 1's -0.0
    # into 0.0.
    return abs(math.log(schedule.p0)) / schedule.rate


def _ramp_weight(schedule: ExponentialSchedule, t: float) -> float:
    # Exactly 1.0 from T* on: p0 * exp(rate * T*) can round to just below 1.
    if t >= _time_at_full(schedule):
        return 1.0
    x = schedule.rate * t
    if x > _MAX_EXP_ARG:
        # Only reachable with a p0 below ~1e-304, where exp(x) alone would overflow.
        return min(1.0, math.exp(math.log(schedule.p0) + x))
    return min(1.0, schedule.p0 * math.exp(x))


def _step_index(schedule: StepSchedule, r: Rollout) -> int:
    # A step past the end can only come from a state written for a longer schedule (a schedule
    # edit starts a new rollout, so this is corruption): hold at the last step, never crash the
    # request path.
    return min(r.step, len(schedule.steps) - 1)


def _wall(r: Rollout, running: float) -> float:
    """The wall-clock time at which a running rollout reaches `running` seconds."""
    return r.started_at + r.paused_total + running
