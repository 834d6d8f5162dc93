"""Latency at light load: one keep-alive connection paced at a fixed rate (wrk2 is not here).

Blocking `http.client` on purpose: it is the leanest client in the standard library, so less
of what we measure is the client's own time, and the rows share its cost equally (the added
latency of a proxy is a difference of two rows).
"""

from __future__ import annotations

import http.client
import time
from dataclasses import dataclass

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
    p50, p99 = np.percentile(np.array(samples) * 1000.0, [50, 99])
    return Latency(float(p50), float(p99), len(samples), errors)


def _paced(
    conn: http.client.HTTPConnection,
    path: str,
    heads: list[dict[str, str]],
    *,
    rate: float,
    count: int,
) -> tuple[list[float], int]:
    interval = 1.0 / rate
    samples: list[float] = []
    errors = 0
    due = time.perf_counter()
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
