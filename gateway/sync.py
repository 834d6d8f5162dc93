"""Flushes this replica's counts to the store in batches and reads back the fleet-wide ones.

Guards: the request path only increments integers; this loop adds them to the store every
`flush_interval_s` (so any replica sees the others' evidence within one interval) and hands
the global counts back to each guard, which may then cross a bound on its own. Shadows: the
pending (n, mean, M2) of each flag/shadow is merged into the fleet-wide one (Chan's formula,
atomically in the store), with the pair lines for the store's capped stream. While the store
is away everything stays here (a few numbers per flag) and goes out when it returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.core.paired import paired_ttest
from gateway.errors import StoreUnavailable
from gateway.flagstore import FlagStore
from gateway.guard import CanaryGuard
from gateway.metrics import Metrics
from gateway.runtime import Router
from gateway.shadow import Mirror, ShadowStats

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

    async def run(self) -> None:
        while True:
            await self.flush()
            await asyncio.sleep(self._interval)

    async def flush(self) -> None:
        await self.flush_guards()
        await self.flush_shadows()

    async def flush_shadows(self) -> None:
        for flag in list(self._router()):
            for arm in flag.shadows:
                await self._flush_shadow(flag.key, arm.name, self._mirror.stats_for(flag.key, arm))

    async def _flush_shadow(self, key: str, shadow: str, stats: ShadowStats) -> None:
        # Sent even when empty: the answer brings the other replicas' pairs into view.
        pending, pairs = stats.take_pending()
        try:
            merged = await self._store.merge_shadow_stats(key, shadow, pending, pairs)
        except Exception as exc:
            stats.restore_pending(pending, pairs)
            if not isinstance(exc, StoreUnavailable):
                log.exception("shadow flush failed for %s/%s", key, shadow)
            return
        stats.merged = merged
        if merged == stats.published:
            return  # unchanged since the last flush: the gauges already say it (and idle is cheap)
        stats.published = merged
        gauge = self._metrics.shadow_ttest
        gauge.labels(key, shadow, "n").set(merged.n)
        gauge.labels(key, shadow, "mean_diff").set(merged.mean)
        test = paired_ttest(merged)
        if test is not None:
            gauge.labels(key, shadow, "t").set(test.t)
            gauge.labels(key, shadow, "p").set(test.p)

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
            self._metrics.guard_llr.labels(guard.key).set(guard.llr)
            self._metrics.guard_samples.labels(guard.key).set(guard.n)

    async def _flush_one(self, guard: CanaryGuard) -> None:
        guard.refresh_bounds()
        if guard.reset_from is not None:
            counts = await self._store.reset_guard(guard.key, epoch=guard.reset_from)
            guard.reset_from = None
            guard.absorb(counts)
        n, k = guard.take_pending()
        try:
            counts = await self._store.add_guard_counts(guard.key, n, k, epoch=guard.epoch)
        except BaseException:
            guard.restore_pending(n, k)
            raise
        guard.absorb(counts)
