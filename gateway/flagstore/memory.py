"""The embedded flag store: the flags file, loaded at start, edited in memory (one process).

Same semantics as the Redis store (versions, compare-and-set, audit, guard test index
and at-most-once guard deltas) so the
admin API and the controller cannot tell them apart; only nothing outlives the process.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.core.documents import load_yaml
from gateway.core.flags import Flag, parse_flag_set, routes_overlap
from gateway.core.paired import RunningStats
from gateway.core.schedule import Rollout
from gateway.core.totals import Totals
from gateway.errors import (
    ConflictError,
    FieldError,
    InvalidDocument,
    NotFoundError,
    PreconditionRequired,
)
from gateway.flagstore.base import (
    AuditEvent,
    ChangeKind,
    GuardDelta,
    GuardState,
    OnChange,
    StoredFlag,
    validated,
)

AUDIT_KEEP = 10_000


def read_flags_file(path: str | Path) -> list[StoredFlag]:
    """Validate a flags file as a whole; every flag starts at version 1."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidDocument([FieldError(str(path), f"cannot read: {exc.strerror}")]) from exc
    doc: Any = load_yaml(text)
    flag_set = parse_flag_set(doc)
    raw: list[dict[str, Any]] = (doc or {}).get("flags") or []
    return [StoredFlag(flag, dict(item), 1) for flag, item in zip(flag_set.flags, raw, strict=True)]


class MemoryStore:
    kind = "memory"

    def __init__(self, flags_file: str | Path | None) -> None:
        self._flags_file = flags_file
        self._flags: dict[str, StoredFlag] = {}
        self._rollouts: dict[str, Rollout] = {}
        self._guards: dict[str, GuardState] = {}
        # Per flag: replica -> seq of the last delta applied in the current step.
        self._applied: dict[str, dict[str, int]] = {}
        self._shadows: dict[tuple[str, str, str], Totals] = {}  # (key, shadow, metric)
        self._audit: deque[AuditEvent] = deque(maxlen=AUDIT_KEEP)
        self._on_change: OnChange | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._loaded = False

    @property
    def healthy(self) -> bool:
        return True

    async def open(self, on_change: OnChange) -> None:
        self._on_change = on_change
        await self.load()

    async def load(self) -> list[StoredFlag]:
        if not self._loaded:
            if self._flags_file is not None:
                stored = await asyncio.to_thread(read_flags_file, self._flags_file)
                self._flags = {f.key: f for f in stored}
            self._loaded = True
        return [self._flags[k] for k in sorted(self._flags)]

    async def get(self, key: str) -> StoredFlag | None:
        return self._flags.get(key)

    async def put(
        self, flag: Flag, document: dict[str, Any], *, if_match: int | None, event: AuditEvent
    ) -> StoredFlag:
        flag = validated(flag, document)
        current = self._flags.get(flag.key)
        _check_version(flag.key, current.version if current else None, if_match)
        # No await between this check and the write: atomic on the event loop.
        clashes = [
            f"overlaps the route of flag {other.key!r} ({other.flag.route.path_prefix!r})"
            for other in self._flags.values()
            if other.key != flag.key and routes_overlap(flag.route, other.flag.route)
        ]
        if clashes:
            raise InvalidDocument([FieldError("route", message) for message in clashes])
        stored = StoredFlag(flag, document, (current.version if current else 0) + 1)
        self._flags[flag.key] = stored
        self._audit.append(
            replace(
                event,
                version_before=current.version if current else None,
                version_after=stored.version,
            )
        )
        await self._announce("flag", flag.key)
        return stored

    async def delete(self, key: str, *, if_match: int, event: AuditEvent) -> None:
        current = self._flags.get(key)
        if current is None:
            raise NotFoundError(f"no flag {key!r}")
        _check_version(key, current.version, if_match)
        del self._flags[key]
        self._rollouts.pop(key, None)
        self._guards.pop(key, None)
        self._applied.pop(key, None)
        self._audit.append(replace(event, version_before=current.version, version_after=None))
        await self._announce("flag", key)

    async def audit(self, *, flag: str | None = None, limit: int = 100) -> list[AuditEvent]:
        events = [e for e in reversed(self._audit) if flag is None or e.flag == flag]
        return events[:limit]

    async def record(self, event: AuditEvent) -> None:
        self._audit.append(event)

    async def rollout(self, key: str) -> Rollout | None:
        return self._rollouts.get(key)

    async def save_rollout(
        self,
        key: str,
        rollout: Rollout,
        *,
        expected: Rollout | None,
        event: AuditEvent | None = None,
    ) -> bool:
        if self._rollouts.get(key) != expected:
            return False
        self._rollouts[key] = rollout
        if event is not None:
            self._audit.append(event)
        await self._announce("rollout", key)
        return True

    async def guard_state(self, key: str) -> GuardState:
        return self._guards.get(key, GuardState())

    async def add_guard_delta(self, key: str, delta: GuardDelta) -> GuardState:
        state = self._guards.get(key, GuardState())
        if delta.rollout != state.rollout or not state.step_from <= delta.test <= state.test:
            return state
        applied = self._applied.setdefault(key, {})
        if delta.seq <= applied.get(delta.replica, 0):
            return state  # already applied: its reply was lost and it came again
        applied[delta.replica] = delta.seq
        current = delta.test == state.test
        state = replace(
            state,
            n=state.n + delta.n if current else state.n,
            k=state.k + delta.k if current else state.k,
            llr=state.llr + delta.llr if current else state.llr,
            canary_requests=state.canary_requests + delta.canary_requests,
            canary_errors=state.canary_errors + delta.canary_errors,
            stable_requests=state.stable_requests + delta.stable_requests,
            stable_errors=state.stable_errors + delta.stable_errors,
        )
        self._guards[key] = state
        return state

    async def end_guard_test(
        self, key: str, *, rollout: str, test: int, accepted: bool, new_step: bool
    ) -> GuardState:
        state = self._guards.get(key, GuardState())
        if state.rollout != rollout or state.test != test:
            return state
        arms = GuardState() if new_step else state
        state = replace(
            arms,
            rollout=rollout,
            test=test + 1,
            accepts=state.accepts + (1 if accepted else 0),
            n=0,
            k=0,
            llr=0.0,
            step_from=test + 1 if new_step else state.step_from,
        )
        self._guards[key] = state
        if new_step:  # a delta for an older step is dropped by its test; within the step the
            self._applied.pop(key, None)  # seqs stay, since its arm counts still apply
        await self._announce("guard", key)
        return state

    async def start_guard(self, key: str, *, rollout: str) -> GuardState:
        state = self._guards.get(key, GuardState())
        if state.rollout == rollout:
            return state
        state = GuardState(rollout=rollout)
        self._guards[key] = state
        self._applied.pop(key, None)
        await self._announce("guard", key)
        return state

    async def merge_shadow_stats(
        self,
        key: str,
        shadow: str,
        metric: str,
        pending: RunningStats,
        lines: list[str],
        *,
        unmeasured: int = 0,
        p_look: float = 1.0,
    ) -> Totals:
        totals = self._shadows.get((key, shadow, metric), Totals())
        totals = totals.merge(pending, unmeasured=unmeasured, p_look=p_look)
        self._shadows[(key, shadow, metric)] = totals
        return totals  # pair lines already went to the pair log; one process keeps no copy

    async def shadow_pairs(self, key: str, shadow: str) -> list[str] | None:
        return None

    async def close(self) -> None:
        self._on_change = None

    async def _announce(self, kind: ChangeKind, key: str) -> None:
        if self._on_change is not None:
            # Like a pub/sub message: delivered after the write returns, never inside it.
            task = asyncio.get_running_loop().create_task(self._on_change(kind, key))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)


def _check_version(key: str, current: int | None, if_match: int | None) -> None:
    if if_match is None:
        if current is not None:
            raise PreconditionRequired(
                f"flag {key!r} exists (version {current}): send If-Match with its version"
            )
        return
    if current != if_match:
        raise ConflictError(key, if_match, current)
