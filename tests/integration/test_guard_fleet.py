"""The guard across a fleet (DESIGN 5): three replicas on one real Redis share one test index and
one set of counts, and a delta whose reply was lost while Redis was frozen is counted once."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import redis
from conftest import flag_doc
from waiting import wait_until

OPERATOR = "ops-token-guard-fleet"
TOKENS = {"GATEWAY_ADMIN_TOKENS": f"ops:operator:{OPERATOR}"}
AUTH = {"authorization": f"Bearer {OPERATOR}"}
FLEET_S = 60.0  # replicas under Redis faults settle slowly on a busy 2-core machine


def guard_status(gw: Any) -> dict[str, Any]:
    r = httpx.get(f"{gw.admin_url}/admin/flags/sentiment/status", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    guard: dict[str, Any] = r.json()["guard"]
    return guard


def store_up(gw: Any) -> float:
    for line in httpx.get(f"{gw.admin_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("gateway_flag_store_up "):
            return float(line.split()[1])
    raise AssertionError("no gateway_flag_store_up on /metrics")


class Traffic:
    """Clients spreading requests over every replica (a fresh unit id per request), counting
    the canary answers they saw, until stopped."""

    def __init__(self, replicas: list[Any], *, workers: int = 3) -> None:
        self.urls = [gw.url for gw in replicas]
        self.canary = self.total = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(workers)]

    def _run(self, worker: int) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                url = self.urls[(worker + i) % len(self.urls)]
                headers = {"x-user-id": f"w{worker}-{i}"}
                try:
                    r = client.post(f"{url}/v1/sentiment", content=b"{}", headers=headers)
                except httpx.TransportError as exc:
                    with self._lock:
                        self.failures.append(repr(exc))
                    continue
                finally:
                    i += 1
                with self._lock:
                    self.total += 1
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                    if r.headers.get("x-gateway-variant") == "v2":
                        self.canary += 1

    def wait_for(self, more: int) -> None:
        target = self.total + more
        wait_until(lambda: self.total >= target, f"{more} more answers", within_s=FLEET_S)

    @contextlib.contextmanager
    def running(self) -> Iterator[Traffic]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join(timeout=60)


def test_guard_test_index_and_counts_are_fleet_wide_and_a_retried_delta_counts_once(
    restartable_redis: Any,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    stable, canary = model_server("v1"), model_server("v2")
    # A healthy canary at half the traffic: the guard accepts H0 every 56 clean canary answers
    # counted fleet-wide, so the test index moves while replicas count into it.
    doc = flag_doc(stable.url, canary.url, weight=0.5)
    store = {"kind": "redis", "url": restartable_redis.url, "prefix": scratch_redis_prefix}
    settings = {"store": {**store, "resync_interval_s": 0.5}}
    replicas = [gateway_server(doc, settings=settings, env=TOKENS) for _ in range(3)]
    raw = redis.Redis.from_url(restartable_redis.url, decode_responses=True)
    guard_key = f"{{{scratch_redis_prefix}}}:guard:sentiment"
    redis_pid = restartable_redis.executor.process.pid
    traffic = Traffic(replicas)

    with traffic.running():
        traffic.wait_for(300)
        # Freeze Redis while every replica flushes every 50 ms: scripts sent now are queued
        # in the socket, run when Redis thaws, and their replies are long given up on (1 s
        # socket timeout), so each replica sends those deltas again.
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            wait_until(
                lambda: all(store_up(gw) == 0.0 for gw in replicas),
                "every replica to see it",
                within_s=FLEET_S,
            )
            traffic.wait_for(200)  # counted while Redis is frozen
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        wait_until(
            lambda: all(store_up(gw) == 1.0 for gw in replicas),
            "Redis back everywhere",
            within_s=FLEET_S,
        )
        traffic.wait_for(300)

    assert traffic.failures == []
    seen = traffic.canary
    print(f"answers {traffic.total}, canary answers {seen}")

    def stored_canary_requests() -> int:
        return int(raw.hget(guard_key, "cn") or 0)

    # Every canary answer a client saw is counted in the store exactly once: fewer means a
    # delta was lost, more means a retried delta was applied twice.
    wait_until(lambda: stored_canary_requests() >= seen, "the counts flushed", within_s=FLEET_S)
    assert stored_canary_requests() == seen
    assert int(raw.hget(guard_key, "ce") or 0) == 0

    # One test index for the fleet: once the last counts are in, every replica judges the
    # store's current test. (The store's test may still move after the last flush: the count
    # it holds can already complete a test that a replica then accepts, so the fleet is read
    # once it has settled, not at the first look.)
    def settled() -> dict[str, str] | None:
        state = raw.hgetall(guard_key)
        on_it = all(guard_status(gw)["test"] == int(state["test"]) for gw in replicas)
        return state if on_it and raw.hgetall(guard_key) == state else None

    state = wait_until(settled, "every replica on the store's test", within_s=FLEET_S)
    print(f"guard in Redis: {state}")
    test = int(state["test"])
    accepts = int(state["accepts"])
    # Every acceptance took 56 clean canary answers counted across replicas.
    assert test == accepts + 1 >= 3
    assert accepts * 56 <= seen
    for gw in replicas:
        g = guard_status(gw)
        assert g["A"] == round(math.log(test * (test + 1) / 0.01), 6)
        assert g["accepts"] == accepts
        assert g["n"] == int(state["n"])
