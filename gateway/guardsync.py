"""Flushes the guards' local counts to the store in batches and reads the fleet-wide counts.

The request path only increments integers; this loop adds them to the store every
`flush_interval_s` (so any replica sees the others' evidence within one interval) and hands
the global counts back to each guard, which may then cross a bound on its own. While the store
is away the deltas stay in the guards (two integers each) and go out when it returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.errors import StoreUnavailable
from gateway.flagstore import FlagStore
from gateway.guard import CanaryGuard
from gateway.metrics import Metrics
from gateway.runtime import Router

log = logging.getLogger(__name__)


class GuardSync:
    def __init__(
        self,
        store: FlagStore,
        metrics: Metrics,
        router: Callable[[], Router],
        *,
        interval_s: float,
    ) -> None:
        self._store, self._metrics, self._router = store, metrics, router
        self._interval = interval_s

    async def run(self) -> None:
        while True:
            await self.flush()
            await asyncio.sleep(self._interval)

    async def flush(self) -> None:
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
