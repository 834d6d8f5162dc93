"""Shadow traffic (DESIGN 6): mirror sampled requests off the response path and pair answers.

A sampled request is sent to each shadow as soon as its body is read, in a bounded set of
background tasks (full means the mirror is dropped and counted). The shadow's task then waits
for the primary's outcome, computes the shadow's metric for both answers, logs the pair as
one JSON line on logger `gateway.shadow` (gateway/pairlog.py) and adds
`d = m(shadow) - m(primary)` to the running (n, mean, M2) that the paired t-test reads.
Nothing here can delay or fail the primary: the primary only resolves a future.

Metrics: `latency_ms` (each side's time to its last byte), `error` (1 for a transport failure
or a 5xx), `json:/pointer` (the number at that JSON pointer in each body), `agreement` (the
primary counts 1, the shadow 1 when it answered the same status and body, else 0: the mean
difference is minus the disagreement rate).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.core.paired import Reservoir, RunningStats, paired_ttest, wilcoxon_test
from gateway.errors import UpstreamError
from gateway.pairlog import flush_pair_lines, write_pair
from gateway.runtime import Arm, FlagRuntime
from gateway.upstream import Body

log = logging.getLogger("gateway.mirror")

SUMMARY_EVERY = 100
MAX_PENDING_LINES = 10_000  # pair lines kept for the store while it is away


@dataclass(frozen=True, slots=True)
class Outcome:
    """One side's answer, as the metric needs it."""

    variant: str
    status: int
    failure: str | None
    ms: float
    body: bytes


def metric_value(metric: str, outcome: Outcome, other: Outcome | None = None) -> float | None:
    """The shadow metric of one answer; None when it has no value (e.g. no number there)."""
    if metric == "latency_ms":
        return outcome.ms
    if metric == "error":
        return 1.0 if outcome.failure is not None or outcome.status >= 500 else 0.0
    if metric == "agreement":
        if other is None:
            return 1.0
        same = outcome.status == other.status and _same_body(outcome.body, other.body)
        return 1.0 if same else 0.0
    return json_pointer_number(outcome.body, metric.removeprefix("json:"))


def json_pointer_number(body: bytes, pointer: str) -> float | None:
    try:
        node: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    for raw in pointer.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return float(node)


def _same_body(a: bytes, b: bytes) -> bool:
    if a == b:
        return True
    try:
        return bool(orjson.loads(a) == orjson.loads(b))
    except orjson.JSONDecodeError:
        return False


@dataclass(slots=True)
class ShadowStats:
    """One (flag, shadow) pair's statistics on this replica."""

    metric: str
    merged: RunningStats = field(default_factory=RunningStats)  # fleet-wide, as last read
    published: RunningStats | None = None  # what the t-test gauges show
    pending: RunningStats = field(default_factory=RunningStats)  # here, not yet merged
    reservoir: Reservoir = field(default_factory=Reservoir)
    pairs: int = 0
    lines: list[str] = field(default_factory=list)  # pair lines for the store's capped stream

    def add(self, d: float, rng: random.Random) -> None:
        self.pending = self.pending.add(d)
        self.reservoir.add(d, rng)
        self.pairs += 1

    def take_pending(self) -> tuple[RunningStats, list[str]]:
        pending, lines = self.pending, self.lines
        self.pending, self.lines = RunningStats(), []
        return pending, lines

    def restore_pending(self, pending: RunningStats, lines: list[str]) -> None:
        """A flush failed: merge back (pairs counted meanwhile are kept too)."""
        self.pending = pending.merge(self.pending)
        self.lines = (lines + self.lines)[-MAX_PENDING_LINES:]

    @property
    def total(self) -> RunningStats:
        return self.merged.merge(self.pending)

    def report(self, shadow: str) -> dict[str, Any]:
        test = paired_ttest(self.total)
        out: dict[str, Any] = {"shadow": shadow, "metric": self.metric, "n": self.total.n}
        if test is None:
            out |= {
                "mean_diff": self.total.mean if self.total.n else None,
                "t": None,
                "df": None,
                "p": None,
                "ci95": None,
            }
        else:
            out |= test.as_dict()
        wilcoxon = wilcoxon_test(self.reservoir.values())
        out["wilcoxon_signed_rank_on_reservoir"] = wilcoxon.as_dict() if wilcoxon else None
        return out


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
        self.stats: dict[tuple[str, str], ShadowStats] = {}

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
        try:
            response = await arm.client.send(method, arm.origin, target, headers, body)
            status = response.status
            try:
                whole = response.complete_body()
                if whole is not None:
                    chunks.append(whole)
                else:
                    async for chunk in response.chunks():
                        if size <= self._limit:
                            chunks.append(chunk)
                            size += len(chunk)
            finally:
                await response.aclose()
        except UpstreamError as exc:
            failure = exc.kind
        ms = (time.perf_counter() - started) * 1000.0
        return Outcome(arm.name, status, failure, ms, b"".join(chunks))

    def _pair(
        self, flag: FlagRuntime, arm: Arm, primary: Outcome, shadow: Outcome, *, request_id: str
    ) -> None:
        metric = arm.metric
        primary_value = metric_value(metric, primary)
        shadow_value = metric_value(metric, shadow, primary)
        stats = self.stats_for(flag.key, arm)
        d = None
        if primary_value is not None and shadow_value is not None:
            d = shadow_value - primary_value
            stats.add(d, self._rng)
            if stats.pairs % SUMMARY_EVERY == 0:
                # The t-test only: the Wilcoxon test ranks the whole reservoir, too slow for
                # the event loop every 100 pairs (the status computes it on demand).
                test = paired_ttest(stats.total)
                summary = {
                    "flag": flag.key,
                    "shadow": arm.name,
                    "metric": metric,
                    **(test.as_dict() if test else {"n": stats.total.n}),
                }
                log.info("shadow summary %s", orjson.dumps(summary).decode())
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
        line = orjson.dumps(record).decode()
        write_pair(line)
        if len(stats.lines) < MAX_PENDING_LINES:
            stats.lines.append(line)

    def stats_for(self, key: str, arm: Arm) -> ShadowStats:
        stats = self.stats.get((key, arm.name))
        if stats is None or stats.metric != arm.metric:
            stats = self.stats[(key, arm.name)] = ShadowStats(arm.metric)
        return stats

    def report(self, flag: FlagRuntime) -> list[dict[str, Any]]:
        return [self.stats_for(flag.key, arm).report(arm.name) for arm in flag.shadows]

    async def drain(self, timeout_s: float) -> None:
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=timeout_s)
        flush_pair_lines()


def _request_id(headers: list[tuple[str, str]]) -> str:
    for name, value in reversed(headers):
        if name == "x-request-id":
            return value
    return ""
