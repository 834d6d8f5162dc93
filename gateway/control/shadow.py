"""Shadow traffic (DESIGN 6): mirror sampled requests off the response path and pair answers.

A sampled request is sent to each shadow as soon as its body is read, in a bounded set of
background tasks (full means the mirror is dropped and counted). The shadow's task then waits
for the primary's outcome, measures each of the shadow's metrics for both answers
(gateway/control/measure.py), logs each pair as one JSON line on logger `gateway.shadow`
(gateway/control/pairlog.py) and adds `d = m(shadow) - m(primary)` to that metric's running
statistics (gateway/control/shadowstats.py). A pair without a finite value on either side is logged
with `d: null` and the reason, and counted as unmeasured. Nothing here can delay or fail the
primary: the primary only resolves a future.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import orjson

from gateway.control.measure import Outcome, measure
from gateway.control.pairlog import flush_pair_lines, write_pair
from gateway.control.runtime import Arm, FlagRuntime
from gateway.control.shadowstats import ShadowStats, signed_rank, verdicts
from gateway.core.paired import paired_ttest
from gateway.dataplane.bodyroute import with_model
from gateway.dataplane.headers import is_event_stream
from gateway.dataplane.sse import StreamWatch
from gateway.dataplane.upstream import Body
from gateway.errors import StoreUnavailable, UpstreamError
from gateway.flagstore import FlagStore

__all__ = ["Mirror", "Outcome", "Pairing", "ShadowStats"]

log = logging.getLogger("gateway.mirror")

SUMMARY_EVERY = 100


class Pairing:
    """What the primary path holds for a mirrored request: it resolves `primary` once."""

    __slots__ = ("capture_limit", "primary", "wants_body")

    def __init__(self, wants_body: bool, capture_limit: int) -> None:
        self.primary: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        self.wants_body = wants_body
        self.capture_limit = capture_limit

    def done(self, outcome: Outcome | None) -> None:
        if not self.primary.done():
            self.primary.set_result(outcome)


class Mirror:
    """Mirrors requests to shadows in at most `max_in_flight` background tasks."""

    def __init__(
        self,
        *,
        max_in_flight: int,
        mirror_max_body_bytes: int,
        wait_for_primary_s: float,
        seed: int | None = None,
    ) -> None:
        self._max_in_flight = max_in_flight
        self._limit = mirror_max_body_bytes
        self._wait = wait_for_primary_s
        self._rng = random.Random(seed)
        self.in_flight: set[asyncio.Task[None]] = set()
        self.stats: dict[tuple[str, str, str], ShadowStats] = {}  # (flag, shadow, metric)

    def begin(
        self,
        flag: FlagRuntime,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
    ) -> Pairing | None:
        """Called once the request body is read; never blocks, never raises."""
        if method not in flag.mirror_methods or not (body is None or isinstance(body, bytes)):
            return None
        if body is not None and len(body) > self._limit:
            return None
        pairing: Pairing | None = None
        for arm in flag.shadows:
            if self._rng.random() >= arm.sample:
                continue
            if len(self.in_flight) >= self._max_in_flight:
                arm.meters.outcomes["dropped"].inc()
                continue
            if pairing is None:
                pairing = Pairing(flag.shadows_want_body, self._limit)
            task = pairing.primary.get_loop().create_task(
                self._mirror(flag, arm, pairing, method, target, headers, body)
            )
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
        return pairing

    async def _mirror(
        self,
        flag: FlagRuntime,
        arm: Arm,
        pairing: Pairing,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
    ) -> None:
        if arm.model is not None and (body is None or isinstance(body, bytes)):
            body = with_model(body, arm.model)  # the shadow's own model name, off the path
        shadow = await self._call(arm, method, target, headers, body)
        outcome_label = "error" if shadow.failure or shadow.status >= 500 else "ok"
        arm.meters.outcomes[outcome_label].inc()
        answered = pairing.primary
        if answered.done():  # the usual case: the primary's answer came first
            primary = answered.result()
        else:
            try:
                async with asyncio.timeout(self._wait):
                    # Shielded: the timeout must not cancel what other shadows wait on too.
                    primary = await asyncio.shield(answered)
            except TimeoutError:
                return
        if primary is None:
            return  # the primary never completed (client gone): nothing to pair
        self._pair(flag, arm, primary, shadow, request_id=_request_id(headers))

    async def _call(
        self, arm: Arm, method: str, target: str, headers: list[tuple[str, str]], body: Body
    ) -> Outcome:
        started = time.perf_counter()
        status, failure, chunks, size = 0, None, [], 0
        watch = None
        try:
            response = await arm.client.send(method, arm.origin, target, headers, body)
            status = response.status
            if is_event_stream([(n.lower(), v) for n, v in response.headers]):
                watch = StreamWatch(started)  # timed event by event, like the primary's
            try:
                whole = response.complete_body()
                if whole is not None:
                    chunks.append(whole)
                    if watch is not None:
                        watch.feed(whole, time.perf_counter())
                else:
                    async for chunk in response.chunks():
                        if watch is not None:
                            watch.feed(chunk, time.perf_counter())
                        if size <= self._limit:
                            chunks.append(chunk)
                            size += len(chunk)
            finally:
                await response.aclose()
        except UpstreamError as exc:
            failure = exc.kind
            if watch is not None:
                watch.cut = True
        ms = (time.perf_counter() - started) * 1000.0
        if watch is not None:
            watch.finish()
        return Outcome(arm.name, status, failure, ms, b"".join(chunks), watch)

    def _pair(
        self, flag: FlagRuntime, arm: Arm, primary: Outcome, shadow: Outcome, *, request_id: str
    ) -> None:
        for metric in arm.metrics:
            try:
                self._pair_metric(flag, arm, metric, primary, shadow, request_id=request_id)
            except Exception:  # a pair is never lost without a trace
                log.exception("shadow pair %s/%s %s not recorded", flag.key, arm.name, metric)

    def _pair_metric(
        self,
        flag: FlagRuntime,
        arm: Arm,
        metric: str,
        primary: Outcome,
        shadow: Outcome,
        *,
        request_id: str,
    ) -> None:
        primary_value, primary_reason = measure(metric, primary)
        shadow_value, shadow_reason = measure(metric, shadow, primary)
        stats = self.stats_for(flag.key, arm, metric)
        d: float | None = None
        reason = _reason(primary_reason, shadow_reason)
        if primary_value is not None and shadow_value is not None:
            d = shadow_value - primary_value
            try:
                stats.add(d)
            except ValueError:  # d or the running M2 overflowed a double
                d, reason = None, "overflow"
        if d is None:
            stats.pending_unmeasured += 1
            arm.meters.outcomes["unmeasured"].inc()
        elif stats.pairs % SUMMARY_EVERY == 0:
            self._summary(flag.key, arm.name, stats)
        record = {
            "ts": time.time(),
            "flag": flag.key,
            "shadow": arm.name,
            "request_id": request_id,
            "primary_variant": primary.variant,
            "primary_status": primary.status,
            "shadow_status": shadow.status,
            "primary_ms": round(primary.ms, 3),
            "shadow_ms": round(shadow.ms, 3),
            "metric": metric,
            "primary_value": primary_value,
            "shadow_value": shadow_value,
            "d": d,
        }
        if reason is not None:
            record["reason"] = reason
        line = orjson.dumps(record).decode()
        write_pair(line)
        stats.keep_line(line)

    @staticmethod
    def _summary(key: str, shadow: str, stats: ShadowStats) -> None:
        # The t-test only: the Wilcoxon test ranks every kept pair, too slow for the event
        # loop every 100 pairs (the status computes it on demand).
        test = paired_ttest(stats.total)
        summary = {
            "flag": key,
            "shadow": shadow,
            "metric": stats.metric,
            **(test.as_dict() if test else {"n": stats.total.n}),
        }
        log.info("shadow summary %s", orjson.dumps(summary).decode())

    def stats_for(self, key: str, arm: Arm, metric: str) -> ShadowStats:
        stats = self.stats.get((key, arm.name, metric))
        mde = arm.mde.get(metric)
        if stats is None:
            stats = self.stats[(key, arm.name, metric)] = ShadowStats(metric, mde)
        stats.mde = mde  # an edit of the flag's mde applies from the next look
        return stats

    def report(
        self, flag: FlagRuntime, wilcoxon: dict[tuple[str, str], dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """The status entries of every (shadow, metric) of `flag`, with their verdicts;
        `wilcoxon` holds the signed-rank tests per (shadow, metric) from `signed_rank_tests`
        (absent: each runs here, on this replica's own pairs)."""
        entries = [
            self.stats_for(flag.key, arm, metric).report(
                arm.name, None if wilcoxon is None else wilcoxon.get((arm.name, metric))
            )
            for arm in flag.shadows
            for metric in arm.metrics
        ]
        verdicts(entries)
        return entries

    async def signed_rank_tests(
        self, flag: FlagRuntime, store: FlagStore
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """The Wilcoxon test of every (shadow, metric) of `flag` on the fleet's pairs: the ones
        the store keeps (its capped stream) with this replica's not yet flushed, or this
        replica's own where the store keeps none (one process) or cannot be read now. Ranking
        up to the stream's length of pairs runs in a worker thread, off the event loop."""
        samples: dict[tuple[str, str], tuple[list[float], str]] = {}
        for arm in flag.shadows:
            try:
                lines = await store.shadow_pairs(flag.key, arm.name)
            except StoreUnavailable:
                lines = None
            for metric in arm.metrics:
                stats = self.stats_for(flag.key, arm, metric)
                if lines is None:
                    samples[(arm.name, metric)] = (list(stats.recent), "replica")
                else:
                    samples[(arm.name, metric)] = (_diffs(lines + stats.lines, metric), "store")

        def run() -> dict[tuple[str, str], dict[str, Any]]:
            return {key: signed_rank(diffs, whose) for key, (diffs, whose) in samples.items()}

        return await asyncio.to_thread(run)

    async def drain(self, timeout_s: float) -> None:
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=timeout_s)
        flush_pair_lines()


def _request_id(headers: list[tuple[str, str]]) -> str:
    for name, value in reversed(headers):
        if name == "x-request-id":
            return value
    return ""


def _reason(primary: str | None, shadow: str | None) -> str | None:
    if primary is None and shadow is None:
        return None
    sides = (("primary", primary), ("shadow", shadow))
    return "; ".join(f"{side}: {why}" for side, why in sides if why)


def _diffs(lines: list[str], metric: str) -> list[float]:
    """The differences of `metric` in these pair lines (unmeasured ones have none)."""
    diffs = []
    for line in lines:
        record = orjson.loads(line)
        if record.get("metric") == metric and record.get("d") is not None:
            diffs.append(float(record["d"]))
    return diffs
