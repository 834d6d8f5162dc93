"""The status document of one flag (DESIGN 8): state, weight, step, next change, guard, traffic.

Field names are a contract with operators' tooling and the CLI; more fields are welcome.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.control.runtime import FlagRuntime
from gateway.core import schedule as sched
from gateway.core.flags import StepSchedule
from gateway.core.schedule import Rollout


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def flag_status(
    flag: FlagRuntime,
    rollout: Rollout | None,
    now: float,
    *,
    pending_rollback: bool = False,
    shadows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    doc = flag.flag
    schedule = doc.schedule
    state = rollout.phase.value if rollout is not None else "running"
    if pending_rollback or (flag.guard is not None and flag.guard.tripped):
        state = "rolled_back"
    next_change = None
    if rollout is not None and flag.canary is not None and state not in ("rolled_back",):
        next_change = sched.next_change_at(
            schedule, rollout, now, requires_evidence=doc.advance_requires_evidence
        )
    status: dict[str, Any] = {
        "key": doc.key,
        "version": flag.version,
        "state": state,
        "weight": flag.weight,
        "canary_open": flag.canary_open,
        "stable": doc.stable.name,
        "canary": doc.canary.name if doc.canary else None,
        "schedule": schedule.kind,
        "step": rollout.step
        if rollout is not None and isinstance(schedule, StepSchedule)
        else None,
        "steps": len(schedule.steps) if isinstance(schedule, StepSchedule) else None,
        "evidence": rollout.evidence if rollout is not None else False,
        "running_s": round(sched.running_time(rollout, now), 3) if rollout else 0.0,
        "started_at": iso(rollout.started_at) if rollout else None,
        "changed_at": iso(rollout.changed_at) if rollout else None,
        "reason": rollout.reason if rollout else "",
        "next_change_at": iso(next_change),
        "guard": flag.guard.status() if flag.guard is not None else None,
        "shadows": shadows or [],
        "traffic": flag.traffic(),
    }
    return status
