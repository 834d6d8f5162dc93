"""Latency at light load: one keep-alive connection paced at a fixed rate (wrk2 is not here).

Blocking `http.client` on purpose: it is the leanest client in the standard library, so less
of what we measure is the client's own time, and the rows share its cost equally (the added
latency of a proxy is a difference of two rows).

A row's added latency is the difference of two rows' figures, and on a shared virtual machine
the latency of the same process drifts by tenths of a millisecond from one minute to the next.
`interleaved` therefore measures all rows in the same stretch of time, taking turns in short
blocks, so that a drift moves every row alike instead of the row it happens to fall on.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Latency:
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def measure(port: int, *, path: str = "/", rate: float, seconds: float, users: int = 0) -> Latency:
    """p50 and p99 of `rate * seconds` paced GETs; with `users`, each request carries
    `x-user-id: user-<n>` for n = 1..users round robin (as bench/users.lua does for wrk)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
    heads = [{"x-user-id": f"user-{n}"} for n in range(1, users + 1)] or [{}]
    try:
        _paced(conn, path, heads, rate=rate, count=max(1, round(rate * 0.5)))  # warm up
        samples, errors = _paced(conn, path, heads, rate=rate, count=max(1, round(rate * seconds)))
    finally:
        conn.close()
    return _latency(samples, errors)


@dataclass(slots=True)
class _Target:
    conn: http.client.HTTPConnection
    heads: list[dict[str, str]]
    sent: int = 0
    samples: list[float] = field(default_factory=list)
    errors: int = 0


def interleaved(
    targets: Sequence[tuple[int, int]],
    *,
    path: str = "/",
    rate: float,
    seconds: float,
    block_s: float = 0.5,
) -> list[Latency]:
    """`measure` for several (port, users) targets at once: each is paced at `rate` for
    `seconds` in all, in blocks of `block_s`, the targets taking turns in a fixed order (so
    that none idles for longer than the others' blocks: servers close idle keep-alive
    connections, uvicorn's after 5 s). A block starts with one request left out of the figures, one
    interval before the measured ones: a target idles while the others have their turns, and
    at `rate` a process is never idle for longer than one interval."""
    open_: list[_Target] = []
    try:
        for port, users in targets:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
            heads = [{"x-user-id": f"user-{n}"} for n in range(1, users + 1)] or [{}]
            open_.append(_Target(conn, heads))
        per_block = max(1, round(rate * block_s))
        blocks = max(1, round(rate * seconds / per_block))
        for target in open_:
            _turn(target, path, rate=rate, count=max(1, round(rate * 0.5)), keep=False)  # warm up
        for _ in range(blocks):
            for target in open_:
                _turn(target, path, rate=rate, count=1, keep=False)
                _turn(target, path, rate=rate, count=per_block, keep=True, delay=1.0 / rate)
    finally:
        for target in open_:
            target.conn.close()
    return [_latency(t.samples, t.errors) for t in open_]


def _turn(
    target: _Target, path: str, *, rate: float, count: int, keep: bool, delay: float = 0.0
) -> None:
    heads = target.heads
    first = target.sent
    target.sent += count
    samples, errors = _paced(
        target.conn,
        path,
        [heads[(first + i) % len(heads)] for i in range(count)],
        rate=rate,
        count=count,
        delay=delay,
    )
    if keep:
        target.samples += samples
        target.errors += errors


def _latency(samples: list[float], errors: int) -> Latency:
    p50, p99 = np.percentile(np.array(samples) * 1000.0, [50, 99])
    return Latency(float(p50), float(p99), len(samples), errors)


def _paced(
    conn: http.client.HTTPConnection,
    path: str,
    heads: list[dict[str, str]],
    *,
    rate: float,
    count: int,
    delay: float = 0.0,
) -> tuple[list[float], int]:
    interval = 1.0 / rate
    samples: list[float] = []
    errors = 0
    due = time.perf_counter() + delay
    for i in range(count):
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        started = time.perf_counter()
        conn.request("GET", path, headers=heads[i % len(heads)])
        response = conn.getresponse()
        response.read()
        samples.append(time.perf_counter() - started)
        errors += response.status >= 400
        due += interval
    return samples, errors
