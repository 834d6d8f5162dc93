"""The rollout controller: moves each flag along its schedule and writes its transitions.

One controller per replica and no leader: the weight is a function of the persisted rollout
state and the wall clock, so every replica computes the same value. Every transition (next
step, promotion, rollback, operator action) is a compare-and-set on the rollout state; the
replica that loses the race adopts the winner's state. A rollback decided while the store is
away closes the canary locally at once and is written when the store returns, never lost.

Whatever reads the store and applies what it read to this replica's flags holds `lock`: the
tick (per flag), operator actions, rollback writes and the gateway's change handler. Each of
them awaits Redis between its read and its apply, so without the lock a state read earlier
could be applied over one read later (a rolled-back canary reopened, a new flag's route
replaced by the document before it) until the next change.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gateway.control.guard import CanaryGuard, rollout_id
from gateway.control.runtime import FlagRuntime, Router
from gateway.core import schedule as sched
from gateway.core.flags import parse_flag
from gateway.core.lifecycle import needs_new_rollout, plan_of, promoted_document, same_canary
from gateway.core.schedule import Phase, Rollout
from gateway.errors import (
    ConflictError,
    IllegalTransition,
    InvalidDocument,
    NotFoundError,
    StoreUnavailable,
)
from gateway.flagstore import AuditEvent, FlagStore
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

CONTROLLER = "controller"
GUARD = "guard"

ACTIONS = ("rollback", "promote", "pause", "resume", "restart")
# The rollout's reason once a promotion was refused (and audited): not audited again.
PROMOTION_BLOCKED = "promotion_blocked"

__all__ = ["ACTIONS", "CONTROLLER", "GUARD", "PROMOTION_BLOCKED", "Controller", "plan_of"]


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
        self._rollouts: dict[str, Rollout] = {}
        # Rollbacks decided here but not yet written (store away): key -> audit event.
        self._pending_rollbacks: dict[str, AuditEvent] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.lock = asyncio.Lock()

    # -- what this replica knows ----------------------------------------------------------------

    def rollout(self, key: str) -> Rollout | None:
        """The rollout state this replica last read or wrote for `key` (None: none yet)."""
        return self._rollouts.get(key)

    def rollback_pending(self, key: str) -> bool:
        """True while a rollback of `key` is decided here but not yet written to the store; the
        canary stays closed on this replica meanwhile."""
        return key in self._pending_rollbacks

    def unwritten_rollbacks(self) -> dict[str, AuditEvent]:
        """A copy of the rollbacks not yet written (key -> audit event), for the snapshot file."""
        return dict(self._pending_rollbacks)

    def adopt_unwritten_rollbacks(self, pending: dict[str, AuditEvent]) -> None:
        """Take over rollbacks a previous run decided but could not write (from the snapshot
        file): each is written when the store answers, and its canary stays closed till then."""
        self._pending_rollbacks.update(pending)

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
        for key in list(self._router().by_key):
            async with self.lock:
                flag = self._router().by_key.get(key)  # replaced or deleted while we waited
                if flag is not None:
                    await self._tick_flag(flag, now)

    async def _tick_flag(self, flag: FlagRuntime, now: float) -> None:
        if flag.canary is None:
            rollout = await self._forget_plan(flag.key)
            flag.weight, flag.canary_open = 0.0, False
            self._show(flag, rollout.phase.value if rollout else "running")
            return
        if not await self._rollback_written(flag):
            # Nothing may move this rollout on meanwhile: a step or a promotion now would
            # carry a canary this replica has rejected.
            known = self._rollouts.get(flag.key)
            if known is not None:
                self.apply(flag, known, now)
            return
        rollout = await self._current(flag, now)
        if _rolls_out(rollout, flag):
            rollout = await self._step(flag, rollout, now)
        # Else another replica started the rollout of a document this one has not applied yet:
        # that rollout is not this document's to move on, and its canary waits (no weight).
        self.apply(flag, rollout, now)

    async def _step(self, flag: FlagRuntime, rollout: Rollout, now: float) -> Rollout:
        """Move `flag`'s own rollout on by its schedule (promoting the document when it is
        done); the rollout this replica knows afterwards."""
        doc = flag.flag
        moved = sched.advance(
            doc.schedule, rollout, now, requires_evidence=doc.advance_requires_evidence
        )
        if moved is not rollout:
            if await self._store.save_rollout(flag.key, moved, expected=rollout):
                log.info(
                    "flag %s: %s step %d (%s)", flag.key, moved.phase, moved.step, moved.reason
                )
                if moved.step != rollout.step and flag.guard is not None:
                    flag.guard.new_step()  # the flusher tells the store (and so the fleet)
            rollout = await self._reload(flag.key) or moved
            if not _rolls_out(rollout, flag):
                return rollout  # replaced meanwhile by another replica's new rollout
        await self._follow_rollout(flag, rollout)
        if rollout.phase is Phase.PROMOTED:
            await self._promote_document(flag, rollout)
            # A refused promotion read the rollout again, maybe moved on by another replica.
            rollout = self._rollouts.get(flag.key) or rollout
        return rollout

    def apply(self, flag: FlagRuntime, rollout: Rollout, now: float) -> None:
        """Take `rollout` as this replica's knowledge of `flag` and set the request path's view
        of the flag from it. A rollout of another canary or schedule than the flag's (the
        document replaced them since, or this replica has not yet applied the document that
        replaced the canary it serves) gives the canary no traffic by weight: not until the
        flag's own rollout starts or the newer document arrives."""
        self._rollouts[flag.key] = rollout
        if not _rolls_out(rollout, flag):
            if flag.canary is not None and flag.weight:
                flag.weight = 0.0
                self._metrics.canary_weight.labels(flag.key).set(0.0)
            return
        closed = rollout.phase is Phase.ROLLED_BACK or flag.key in self._pending_rollbacks
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
        """Another replica moved this flag's rollout: adopt its state now. The caller holds
        `lock` (the gateway's change handler)."""
        flag = self._router().by_key.get(key)
        previous = self._rollouts.get(key)
        rollout = await self._reload(key)
        if flag is None or rollout is None:
            return
        if previous is not None and rollout.started_at != previous.started_at:
            # A new rollout (restart, new canary): the old test and its verdict are void.
            self._pending_rollbacks.pop(key, None)
        if _rolls_out(rollout, flag):  # else the document is newer: the next tick starts it
            await self._follow_rollout(flag, rollout)
            self.apply(flag, rollout, self._clock())

    async def _forget_plan(self, key: str) -> Rollout | None:
        """The canary is gone (promoted or removed): a canary added later is a new rollout,
        even one identical to the last."""
        rollout = self._rollouts.get(key) or await self._reload(key)
        if rollout is None or rollout.plan == "":
            return rollout
        # Not audited: no transition, only what a later canary is compared with. Whoever
        # writes it first, the reload shows it.
        await self._store.save_rollout(key, replace(rollout, plan=""), expected=rollout)
        return await self._reload(key)

    async def _current(self, flag: FlagRuntime, now: float) -> Rollout:
        rollout = self._rollouts.get(flag.key) or await self._reload(flag.key)
        plan = flag.plan
        if rollout is not None and not needs_new_rollout(rollout.plan, plan, rollout.phase):
            return rollout  # a schedule edit alone leaves a rolled-back rollout rolled back
        # No rollout yet, a new canary, or a new schedule for a running one: a new rollout.
        fresh = sched.start(now, plan=plan)
        if await self._store.save_rollout(flag.key, fresh, expected=rollout):
            if rollout is not None:
                log.info("flag %s: canary or schedule changed, new rollout", flag.key)
            self._pending_rollbacks.pop(flag.key, None)
            await self._follow_rollout(flag, fresh)
            return fresh
        return await self._reload(flag.key) or fresh

    async def _reload(self, key: str) -> Rollout | None:
        """Read `key`'s rollout from the store, and serve it at once: what this replica knows of
        a rollout is what its request path does, whichever task read it (a tick, an operator's
        action that is then refused, a guard's write). A rollback read here closes the canary
        now, not when the change message or the next tick comes. A rollout of another canary or
        schedule than the document's stops the canary's traffic by weight (`apply`)."""
        rollout = await self._store.rollout(key)
        if rollout is None:  # deleted with its flag: one created again under the key starts anew
            self._rollouts.pop(key, None)
            return None
        flag = self._router().by_key.get(key)
        if flag is None:
            self._rollouts[key] = rollout
        else:
            self.apply(flag, rollout, self._clock())
        return rollout

    def forget(self, key: str) -> None:
        """The flag was deleted: drop what this replica kept of its rollout."""
        self._rollouts.pop(key, None)
        self._pending_rollbacks.pop(key, None)

    async def _follow_rollout(self, flag: FlagRuntime, rollout: Rollout) -> None:
        """Point the guard at `rollout`: a rollout it has not counted for starts at test 1
        (fleet-wide, once: the store keeps the state of the rollout it was started for)."""
        guard = flag.guard
        if guard is None:
            return
        name = rollout_id(rollout)
        if guard.rollout != name:
            guard.restart(await self._store.start_guard(flag.key, rollout=name))

    # -- promotion ----------------------------------------------------------------------------

    async def _promote_document(self, flag: FlagRuntime, rollout: Rollout) -> None:
        """The canary becomes stable and the old stable is retired, once, fleet-wide.

        The promoted document is validated like an operator's; one that would not validate is
        never written: the promotion is refused (audited and counted once, by the replica whose
        compare-and-set marks it) and the canary keeps full weight until an operator acts.
        """
        stored = await self._store.get(flag.key)
        if (
            stored is None
            or stored.flag.canary is None
            or not same_canary(plan_of(stored.flag), rollout.plan)
        ):
            return
        document = promoted_document(stored.document)
        try:
            promoted = parse_flag(document)
        except InvalidDocument as exc:
            await self._block_promotion(flag.key, rollout, exc)
            return
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
        except InvalidDocument as exc:  # the store's own check (a route taken meanwhile, ...)
            await self._block_promotion(flag.key, rollout, exc)

    async def _block_promotion(self, key: str, rollout: Rollout, exc: InvalidDocument) -> None:
        if rollout.reason == PROMOTION_BLOCKED:
            return  # refused and audited already; an operator edit or action moves it on
        errors = [e.as_dict() for e in exc.errors]
        event = AuditEvent(
            ts=self._clock(),
            actor=CONTROLLER,
            action=PROMOTION_BLOCKED,
            flag=key,
            reason="; ".join(f"{e['path']}: {e['message']}" for e in errors),
            details={"errors": errors},
        )
        marked = replace(rollout, reason=PROMOTION_BLOCKED)
        if await self._store.save_rollout(key, marked, expected=rollout, event=event):
            self._metrics.promotions_blocked.labels(key).inc()
            log.error("flag %s: promotion refused, the canary keeps full weight: %s",
                      key, event.reason)  # fmt: skip
        await self._reload(key)

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
            details={
                "n": guard.n,
                "k": guard.k,
                "llr": guard.llr,
                **_bounds(guard),
                "error_kinds": dict(guard.error_kinds),
            },
        )
        self._pending_rollbacks[guard.key] = event
        log.warning("flag %s: guard rejected the canary (n=%d k=%d llr=%.3f >= A=%.3f)",
                    guard.key, guard.n, guard.k, guard.llr, guard.A)  # fmt: skip
        self._spawn(self._write_rollback_now(guard.key))

    def on_guard_accept(self, guard: CanaryGuard) -> None:
        self._spawn(self._record_evidence(guard.key))

    async def _write_rollback_now(self, key: str) -> None:
        async with self.lock:
            flag = self._router().by_key.get(key)
            event = self._pending_rollbacks.get(key)
            if flag is not None and event is not None:  # else: superseded while we waited
                await self._write_rollback(flag, event)

    async def _rollback_written(self, flag: FlagRuntime) -> bool:
        """Write the rollback of `flag` this replica decided but has not written yet, if any;
        False while it stays unwritten (the store failed the write, or lost its state and is
        about to be restored)."""
        event = self._pending_rollbacks.get(flag.key)
        if event is not None:
            await self._write_rollback(flag, event)
        return flag.key not in self._pending_rollbacks

    async def _write_rollback(self, flag: FlagRuntime, event: AuditEvent) -> None:
        try:
            for _ in range(10):
                current = await self._reload(flag.key)
                if current is None:
                    return  # a store that lost its state: kept pending until it is restored
                if current.phase is Phase.ROLLED_BACK:
                    break
                if not same_canary(current.plan, flag.plan):
                    break  # the store's rollout is of another canary (or of none any more)
                # A promoted rollout whose document still has the canary (not written yet, or
                # refused) still serves it: roll it back like a running one, so every replica
                # closes it, not only the one whose guard tripped.
                target = sched.roll_back(current, self._clock(), event.reason)
                if await self._store.save_rollout(flag.key, target, expected=current, event=event):
                    self._rollouts[flag.key] = target  # what this replica wrote, it knows now
                    self._metrics.rollbacks.labels(flag.key, event.reason).inc()
                    log.warning("flag %s: rolled back (%s)", flag.key, event.reason)
                    break
            self._pending_rollbacks.pop(flag.key, None)
            rollout = self._rollouts.get(flag.key)
            if rollout is not None and _rolls_out(rollout, flag):
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
        """rollback | promote | pause | resume | restart, audited.

        Raises NotFoundError for an unknown flag, IllegalTransition for an unknown action or
        one the rollout's state does not allow (nothing is written then), ConflictError when
        another writer moved the rollout meanwhile."""
        async with self.lock:
            return await self._act(key, action, actor=actor, reason=reason)

    async def _act(self, key: str, action: str, *, actor: str, reason: str) -> Rollout:
        flag = self._router().by_key.get(key)
        if flag is None:
            raise NotFoundError(f"no flag {key!r}")
        if action not in ACTIONS:
            raise IllegalTransition(
                f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}"
            )
        if flag.canary is None and action != "restart":
            raise IllegalTransition(f"flag {key!r} has no canary to {action}")
        # The guard decided first: its rollback is written before the action applies, so an
        # operator's promote or resume meets the rolled-back state it would have met had the
        # store answered at once. (A restart voids the test and its verdict.)
        if action != "restart" and not await self._rollback_written(flag):
            raise StoreUnavailable(f"flag {key!r}: a rollback decided here is not written yet")
        now = self._clock()
        current = await self._reload(key)
        if current is None:
            current = await self._current(flag, now)
        try:
            target = _transition(action, current, now, plan=flag.plan, reason=reason)
        except ValueError as exc:  # the schedule's rule for this phase (core raises ValueError)
            raise IllegalTransition(str(exc)) from exc
        change = {"from": current.phase.value, "to": target.phase.value}
        event = AuditEvent(
            ts=now, actor=actor, action=action, flag=key, reason=reason, details=change
        )
        if not await self._store.save_rollout(key, target, expected=current, event=event):
            raise ConflictError(key, None, None)
        if action == "rollback":
            self._metrics.rollbacks.labels(key, "operator").inc()
        if action == "restart":
            self._pending_rollbacks.pop(key, None)
            await self._follow_rollout(flag, target)
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
        return sched.roll_back(current, now, why)
    if action == "promote":
        return sched.promote(current, now, why)
    if action == "pause":
        return replace(sched.pause(current, now), reason=why)
    if action == "resume":
        return replace(sched.resume(current, now), reason=why)
    if action == "restart":
        # A new rollout, so a new guard test, even on a clock that has not moved since the one
        # it replaces started (a frozen or coarse clock): the start names the rollout.
        started = max(now, math.nextafter(current.started_at, math.inf))
        return sched.start(started, plan=plan, reason=why)
    raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")


def _rolls_out(rollout: Rollout, flag: FlagRuntime) -> bool:
    """`rollout` is the one of `flag`'s canary and schedule (not of a canary or schedule the
    document has replaced, whose new rollout the controller has yet to start)."""
    plan = flag.plan
    return plan != "" and not needs_new_rollout(rollout.plan, plan, rollout.phase)


def _bounds(guard: CanaryGuard) -> dict[str, object]:
    c = guard.config
    return {"A": guard.A, "B": guard.B, "test": guard.test, "mode": c.mode, "alpha": c.alpha}
