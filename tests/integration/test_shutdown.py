"""Graceful shutdown (DESIGN 10: SIGTERM drains in-flight requests, flushes counters, exits 0),
on a real `gateway serve` process with the Redis store and real, slow model servers, with each
upstream client (`upstream.client`): the requests in flight are the client's."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from conftest import flag_doc

OPERATOR = "ops-token-123456"
TOKENS = {"GATEWAY_ADMIN_TOKENS": f"ops:operator:{OPERATOR}"}
GRACE_S = 10.0
IN_FLIGHT = 50
CLIENTS = ["aiohttp-direct", "httptools", "aiohttp", "httpx"]


def in_flight(gw: Any) -> int:
    return int(httpx.get(f"{gw.admin_url}/readyz").json()["in_flight"])


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.parametrize("client_kind", CLIENTS)
def test_sigterm_drains_in_flight_requests_flushes_counts_and_exits_0(
    client_kind: str,
    redis_url: str,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    stable = model_server("v1", latency_ms=1000)
    canary = model_server("v2", latency_ms=1000)
    store = {"kind": "redis", "url": redis_url, "prefix": scratch_redis_prefix}
    # Counts are flushed once at start and then only by shutdown: whatever reaches Redis after
    # the first flush was written by the SIGTERM path.
    settings = {
        "store": {**store, "flush_interval_s": 3600},
        "shutdown_grace_s": GRACE_S,
        "upstream": {"client": client_kind},
    }
    gw = gateway_server(flag_doc(stable.url, canary.url, weight=0.5), settings=settings, env=TOKENS)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    guard_key = f"{{{scratch_redis_prefix}}}:guard:sentiment"
    answers: list[tuple[int, str]] = []
    errors: list[str] = []

    async def requests() -> None:
        limits = httpx.Limits(max_connections=IN_FLIGHT)
        async with httpx.AsyncClient(base_url=gw.url, timeout=30, limits=limits) as client:

            async def one(i: int) -> None:
                try:
                    r = await client.post(
                        "/v1/sentiment", content=b"{}", headers={"x-user-id": f"u{i}"}
                    )
                except httpx.TransportError as exc:
                    errors.append(repr(exc))
                    return
                answers.append((r.status_code, r.headers.get("x-gateway-variant", "")))

            await asyncio.gather(*(one(i) for i in range(IN_FLIGHT)))

    clients = threading.Thread(target=lambda: asyncio.run(requests()))
    clients.start()
    deadline = time.monotonic() + 5
    while in_flight(gw) < IN_FLIGHT:
        assert time.monotonic() < deadline, f"only {in_flight(gw)} requests reached the gateway"
        time.sleep(0.01)
    counted_before = int(raw.hget(guard_key, "n") or 0)

    gw.server.process.send_signal(signal.SIGTERM)
    sigterm_at = time.monotonic()
    # The listener closes at once, while the 50 are still being served.
    refused, pending_at_refusal = False, IN_FLIGHT
    while not refused and time.monotonic() < sigterm_at + 0.8:
        refused = refuses_connections(gw.server.port)
        pending_at_refusal = IN_FLIGHT - len(answers) - len(errors)
        time.sleep(0.02)
    clients.join(timeout=30)
    code = gw.server.process.wait(timeout=max(0.0, sigterm_at + GRACE_S - time.monotonic()))
    exited_after = time.monotonic() - sigterm_at

    canary_answers = sum(1 for _, variant in answers if variant == "v2")
    counts = raw.hgetall(guard_key)
    print(
        f"SIGTERM with {IN_FLIGHT} in flight: {len(answers)} answered "
        f"{sorted({s for s, _ in answers})}, {len(errors)} errors; refused a new connection "
        f"with {pending_at_refusal} still in flight; exit {code} after {exited_after:.2f} s; "
        f"guard in Redis {counts} (before SIGTERM n={counted_before}), "
        f"client saw {canary_answers} canary answers"
    )
    assert errors == []
    assert [s for s, _ in answers] == [200] * IN_FLIGHT
    assert refused, "a new connection was still accepted 0.8 s after SIGTERM"
    assert pending_at_refusal > 0, "the listener closed only after the in-flight requests ended"
    assert code == 0, gw.server.log()
    assert counted_before == 0 and 0 < canary_answers < IN_FLIGHT
    assert (int(counts["n"]), int(counts["k"])) == (canary_answers, 0)
    assert "Traceback" not in gw.server.log(), gw.server.log()
