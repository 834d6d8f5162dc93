"""The rollout controller: moves each flag along its schedule and writes its transitions.

One controller per replica and no leader: the weight is a function of the persisted rollout
state and the wall clock, so every replica computes the same value. Every transition (next
step, promotion, rollback, operator action) is a compare-and-set on the rollout state; the
replica that loses the race adopts the winner's state. A rollback decided while the store is
away closes the canary locally at once and is written when the store returns, never lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.core import schedule as sched
from gateway.core.flags import Flag
from gateway.core.schedule import Phase, Rollout
from gateway.errors import ConflictError, GatewayError, StoreUnavailable
from gateway.flagstore import AuditEvent, FlagStore
from gateway.guard import CanaryGuard
from gateway.metrics import Metrics
from gateway.runtime import FlagRuntime, Router

log = logging.getLogger(__name__)

CONTROLLER = "controller"
GUARD = "guard"

ACTIONS = ("rollback", "promote", "pause", "resume", "restart")


def plan_of(flag: Flag) -> str:
    """What a rollout rolls out: a new canary upstream or schedule means a new rollout."""
    if flag.canary is None:
        return ""
    what = {"canary": flag.canary.model_dump(), "schedule": flag.schedule.model_dump()}
    return hashlib.blake2b(json.dumps(what, sort_keys=True).encode(), digest_size=8).hexdigest()


class Controller:
    def __init__(
        self,
        store: FlagStore,
        metrics: Metrics,
        router: Callable[[], Router],
        *,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store, self._metrics, self._router = store, metrics, router
        self._interval = interval_s
        self._clock = clock
        self.rollouts: dict[str, Rollout] = {}
        # Rollbacks decided here but not yet written (store away): key -> audit event.
        self.pending_rollbacks: dict[str, AuditEvent] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # -- the clock ----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except StoreUnavailable:
                pass  # serving the last snapshot; the gateway reports the outage
            except Exception:  # the clock must keep running whatever one tick hit
                log.exception("controller tick failed")
            await asyncio.sleep(self._interval)

    async def tick(self) -> None:
        now = self._clock()
        for flag in list(self._router()):
            await self._tick_flag(flag, now)

    async def _tick_flag(self, flag: FlagRuntime, now: float) -> None:
        if flag.canary is None:
            rollout = self.rollouts.get(flag.key) or await self._store.rollout(flag.key)
            flag.weight, flag.canary_open = 0.0, False
            self._show(flag, rollout.phase.value if rollout else "running")
            return
        if flag.key in self.pending_rollbacks:
            await self._write_rollback(flag, self.pending_rollbacks[flag.key])
        rollout = await self._current(flag, now)
        doc = flag.flag
        moved = sched.advance(
            doc.schedule, rollout, now, requires_evidence=doc.advance_requires_evidence
        )
        if moved is not rollout:
            if await self._store.save_rollout(flag.key, moved, expected=rollout):
                log.info(
                    "flag %s: %s step %d (%s)", flag.key, moved.phase, moved.step, moved.reason
                )
                if moved.step != rollout.step:
                    await self._restart_guard(flag)
            rollout = await self._reload(flag.key) or moved
        if rollout.phase is Phase.PROMOTED:
            await self._promote_document(flag, rollout)
        self.apply(flag, rollout, now)

    def apply(self, flag: FlagRuntime, rollout: Rollout, now: float) -> None:
        """Set the request path's view of one flag from its rollout state."""
        self.rollouts[flag.key] = rollout
        closed = rollout.phase is Phase.ROLLED_BACK or flag.key in self.pending_rollbacks
        guard = flag.guard
        if guard is not None and guard.tripped and rollout.phase is not Phase.ROLLED_BACK:
            # Tripped here, and the write is on its way: keep the canary closed meanwhile.
            closed = True
        flag.canary_open = not closed
        flag.weight = 0.0 if closed else sched.weight(flag.flag.schedule, rollout, now)
        self._show(flag, "rolled_back" if closed else rollout.phase.value)

    def _show(self, flag: FlagRuntime, state: str) -> None:
        self._metrics.canary_weight.labels(flag.key).set(flag.weight)
        self._metrics.set_rollout_state(flag.key, state)

    async def refresh(self, key: str) -> None:
        """Another replica moved this flag's rollout: adopt its state now."""
        flag = self._router().by_key.get(key)
        previous = self.rollouts.get(key)
        rollout = await self._reload(key)
        if flag is None or rollout is None:
            return
        if previous is not None and rollout.started_at != previous.started_at:
            # A new rollout (restart, new canary): the old test and its verdict are void.
            self.pending_rollbacks.pop(key, None)
            if flag.guard is not None:
                counts = await self._store.add_guard_counts(key, 0, 0, epoch=flag.guard.epoch)
                flag.guard.restart(counts)
        self.apply(flag, rollout, self._clock())

    async def _current(self, flag: FlagRuntime, now: float) -> Rollout:
        rollout = self.rollouts.get(flag.key) or await self._reload(flag.key)
        plan = plan_of(flag.flag)
        if rollout is not None and rollout.plan == plan:
            return rollout
        # No rollout yet, or the canary's upstream or the schedule changed: a new rollout.
        fresh = sched.start(now, plan=plan)
        if await self._store.save_rollout(flag.key, fresh, expected=rollout):
            if rollout is not None:
                log.info("flag %s: canary or schedule changed, new rollout", flag.key)
            self.pending_rollbacks.pop(flag.key, None)
            await self._restart_guard(flag)
            return fresh
        return await self._reload(flag.key) or fresh

    async def _reload(self, key: str) -> Rollout | None:
        rollout = await self._store.rollout(key)
        if rollout is not None:
            self.rollouts[key] = rollout
        return rollout

    async def _restart_guard(self, flag: FlagRuntime) -> None:
        guard = flag.guard
        if guard is None:
            return
        counts = await self._store.reset_guard(flag.key, epoch=guard.epoch)
        if counts.n or counts.k:  # someone counted into this epoch already: start past it
            counts = await self._store.reset_guard(flag.key, epoch=counts.epoch)
        guard.restart(counts)

    # -- promotion ----------------------------------------------------------------------------

    async def _promote_document(self, flag: FlagRuntime, rollout: Rollout) -> None:
        """The canary becomes stable and the old stable is retired, once, fleet-wide."""
        stored = await self._store.get(flag.key)
        if stored is None or stored.flag.canary is None or plan_of(stored.flag) != rollout.plan:
            return
        document = dict(stored.document)
        document["stable"] = document.pop("canary")
        promoted = stored.flag.model_copy(update={"stable": stored.flag.canary, "canary": None})
        event = AuditEvent(
            ts=self._clock(),
            actor=CONTROLLER,
            action="promote",
            flag=flag.key,
            reason=rollout.reason,
            details={"retired": stored.flag.stable.name, "stable": stored.flag.canary.name},
        )
        try:
            await self._store.put(promoted, document, if_match=stored.version, event=event)
            log.info("flag %s: canary %s promoted to stable", flag.key, stored.flag.canary.name)
        except ConflictError:
            pass  # another replica (or an operator) wrote first; the next sync shows it

    # -- the guard's decisions (called on the request path: never await here) ------------------

    def on_guard_reject(self, guard: CanaryGuard) -> None:
        flag = self._router().by_key.get(guard.key)
        if flag is None:
            return
        flag.canary_open = False  # this replica stops now; the write tells the others
        flag.weight = 0.0
        event = AuditEvent(
            ts=self._clock(),
            actor=GUARD,
            action="rollback",
            flag=guard.key,
            reason="sprt",
            details={"n": guard.n, "k": guard.k, "llr": guard.llr, **_bounds(guard)},
        )
        self.pending_rollbacks[guard.key] = event
        log.warning("flag %s: guard rejected the canary (n=%d k=%d llr=%.3f >= A=%.3f)",
                    guard.key, guard.n, guard.k, guard.llr, guard.bounds.A)  # fmt: skip
        self._spawn(self._write_rollback(flag, event))

    def on_guard_accept(self, guard: CanaryGuard) -> None:
        self._spawn(self._record_evidence(guard.key))

    async def _write_rollback(self, flag: FlagRuntime, event: AuditEvent) -> None:
        try:
            for _ in range(10):
                current = await self._reload(flag.key)
                if current is None or current.phase is Phase.ROLLED_BACK:
                    break
                if current.phase not in (Phase.RUNNING, Phase.PAUSED):
                    break  # promoted meanwhile: nothing to roll back
                target = sched.roll_back(current, self._clock(), event.reason)
                if await self._store.save_rollout(flag.key, target, expected=current, event=event):
                    self._metrics.rollbacks.labels(flag.key, event.reason).inc()
                    log.warning("flag %s: rolled back (%s)", flag.key, event.reason)
                    break
            self.pending_rollbacks.pop(flag.key, None)
            rollout = self.rollouts.get(flag.key)
            if rollout is not None:
                self.apply(flag, rollout, self._clock())
        except (StoreUnavailable, OSError):
            pass  # kept in pending_rollbacks: the next tick after the store returns writes it

    async def _record_evidence(self, key: str) -> None:
        try:
            for _ in range(5):
                current = await self._reload(key)
                if current is None or current.phase is not Phase.RUNNING or current.evidence:
                    return
                if await self._store.save_rollout(
                    key, sched.record_evidence(current), expected=current
                ):
                    return
        except StoreUnavailable:
            pass  # evidence is re-gathered: the guard keeps testing

    # -- operator actions ---------------------------------------------------------------------

    async def act(self, key: str, action: str, *, actor: str, reason: str) -> Rollout:
        """rollback | promote | pause | resume | restart, audited. ValueError when illegal."""
        flag = self._router().by_key.get(key)
        if flag is None:
            raise GatewayError(f"no flag {key!r}")
        if flag.canary is None and action != "restart":
            raise ValueError(f"flag {key!r} has no canary to {action}")
        now = self._clock()
        current = await self._reload(key)
        if current is None:
            current = await self._current(flag, now)
        target = _transition(action, current, now, plan=plan_of(flag.flag), reason=reason)
        change = {"from": current.phase.value, "to": target.phase.value}
        event = AuditEvent(
            ts=now, actor=actor, action=action, flag=key, reason=reason, details=change
        )
        if not await self._store.save_rollout(key, target, expected=current, event=event):
            raise ConflictError(key, None, None)
        if action == "rollback":
            self._metrics.rollbacks.labels(key, "operator").inc()
        if action == "restart":
            self.pending_rollbacks.pop(key, None)
            await self._restart_guard(flag)
        self.apply(flag, target, now)
        return target

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Finish writes already decided (a rollback must not be lost on shutdown)."""
        if self._background:
            await asyncio.wait(self._background, timeout=5)


def _transition(action: str, current: Rollout, now: float, *, plan: str, reason: str) -> Rollout:
    why = reason or "operator"
    if action == "rollback":
        return sched.roll_back(current, now, "operator")
    if action == "promote":
        return sched.promote(current, now, "operator")
    if action == "pause":
        return sched.pause(current, now)
    if action == "resume":
        return sched.resume(current, now)
    if action == "restart":
        return sched.start(now, plan=plan, reason="operator" if why else why)
    raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")


def _bounds(guard: CanaryGuard) -> dict[str, float]:
    b = guard.bounds
    return {"A": b.A, "B": b.B, "e0": b.e0, "e1": b.e1}
