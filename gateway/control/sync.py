"""Flushes this replica's counts to the store in batches and reads back the fleet-wide ones.

Guards: the request path only increments counters; this loop sends them to the store every
`flush_interval_s` (so any replica sees the others' evidence within one interval) and hands
the global state back to each guard, which may then cross a bound on its own. Tests this
replica ended go first, then the delta; a delta whose reply was lost is sent again unchanged
(same replica id and seq), and the store applies it at most once. Shadows: the
pending (n, mean, M2) of each flag/shadow is merged into the fleet-wide one (Chan's formula,
atomically in the store), with the pair lines for the store's capped stream. While the store
is away everything stays here (a few numbers per flag) and goes out when it returns.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

from gateway.control.guard import CanaryGuard
from gateway.control.runtime import Router
from gateway.control.shadow import Mirror
from gateway.control.shadowstats import ShadowStats, verdicts
from gateway.core.paired import paired_ttest
from gateway.errors import StoreUnavailable
from gateway.flagstore import FlagStore
from gateway.metrics import Metrics

log = logging.getLogger(__name__)


class CounterSync:
    def __init__(
        self,
        store: FlagStore,
        metrics: Metrics,
        router: Callable[[], Router],
        mirror: Mirror,
        *,
        interval_s: float,
    ) -> None:
        self._store, self._metrics, self._router = store, metrics, router
        self._mirror = mirror
        self._interval = interval_s
        # Names this process's deltas in the store (at-most-once application, DESIGN 5).
        self.replica = uuid.uuid4().hex[:16]

    async def run(self) -> None:
        while True:
            await self.flush()
            await asyncio.sleep(self._interval)

    async def flush(self) -> None:
        await self.flush_guards()
        await self.flush_shadows()

    async def flush_shadows(self) -> None:
        for flag in list(self._router()):
            looks: list[dict[str, Any]] = []
            for arm in flag.shadows:
                for metric in arm.metrics:
                    stats = self._mirror.stats_for(flag.key, arm, metric)
                    await self._flush_shadow(flag.key, arm.name, stats)
                    look = self._publish(flag.key, arm.name, stats)
                    looks.append({"shadow": arm.name, "metric": metric, **look})
            verdicts(looks)
            for look in looks:
                self._metrics.shadow_verdict.labels(flag.key, look["shadow"], look["metric"]).set(
                    look["direction"]
                )

    async def _flush_shadow(self, key: str, shadow: str, stats: ShadowStats) -> None:
        # Sent even when empty: the answer brings the other replicas' pairs into view.
        pending, unmeasured, pairs = stats.take_pending()
        try:
            stats.fleet = await self._store.merge_shadow_stats(
                key, shadow, stats.metric, pending, pairs, unmeasured=unmeasured, p_look=stats.p_min
            )
        except Exception as exc:
            stats.restore_pending(pending, unmeasured, pairs)
            if not isinstance(exc, StoreUnavailable):
                log.exception("shadow flush failed for %s/%s", key, shadow)

    def _publish(self, key: str, shadow: str, stats: ShadowStats) -> dict[str, Any]:
        """Looks at the fleet-wide totals (moving the always-valid p's running minimum) and
        sets the comparison's gauges; returns what the verdict needs."""
        merged = stats.fleet.stats
        look: dict[str, Any] = {"p_always_valid": None}
        if stats.metric != "agreement":
            look = stats.look()
        look["mean_diff"] = merged.mean
        if stats.fleet == stats.published:
            return look  # unchanged since the last flush: the gauges already say it
        stats.published = stats.fleet
        values: dict[str, float | None] = {"n": merged.n, "mean_diff": merged.mean}
        test = paired_ttest(merged)
        if test is not None:
            values |= {"t": test.t, "p": test.p}
            values |= {"ci95_low": test.ci95[0], "ci95_high": test.ci95[1]}
        values["p_always_valid"] = look["p_always_valid"]
        cs = look.get("cs95")
        if cs is not None:
            values |= {"cs95_low": cs[0], "cs95_high": cs[1]}
        for stat, value in values.items():
            if value is not None:
                self._metrics.shadow_ttest.labels(key, shadow, stats.metric, stat).set(value)
        return look

    async def flush_guards(self) -> None:
        for flag in list(self._router()):
            guard = flag.guard
            if guard is None or flag.canary is None:
                continue
            try:
                await self._flush_one(guard)
            except StoreUnavailable:
                pass  # kept for the next flush; the gateway reports the outage
            except Exception:
                log.exception("guard flush failed for %s", guard.key)
            metrics = self._metrics
            metrics.guard_llr.labels(guard.key).set(guard.llr)
            metrics.guard_samples.labels(guard.key).set(guard.n)
            metrics.guard_bound.labels(guard.key, "A").set(guard.A)
            metrics.guard_bound.labels(guard.key, "B").set(guard.B)

    async def _flush_one(self, guard: CanaryGuard) -> None:
        if not guard.rollout:
            return  # the controller has not named the rollout yet: nothing to count into
        while guard.ends:
            test, accepted, new_step = guard.ends[0]
            state = await self._store.end_guard_test(
                guard.key, rollout=guard.rollout, test=test, accepted=accepted, new_step=new_step
            )
            if guard.ends and guard.ends[0] == (test, accepted, new_step):
                guard.ends.pop(0)
            guard.absorb(state)
        delta = guard.take_delta(self.replica)
        if delta is None:
            # Nothing counted here: read, so that the others' evidence is judged here too.
            guard.absorb(await self._store.guard_state(guard.key))
            return
        # On failure the delta stays in flight and goes again, unchanged, next time.
        guard.delta_applied(await self._store.add_guard_delta(guard.key, delta))
