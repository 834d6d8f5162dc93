"""Failover under load on a real Redis Sentinel deployment (SENTINEL FAILOVER) and a real Redis
Cluster (the master holding the store's slot killed with SIGKILL, its replica promoted), with
real gateways and model servers (DESIGN 7 and 10).

What must hold: no data-plane request fails; every admin write that was acknowledged is on the
new master; a rollback the guard decides while the failover runs reaches the new master (and is
audited once); after the failover a change on one replica still reaches the other through
pub/sub (the timed resync is set far out, so nothing else could deliver it).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
import redis_topologies
from conftest import flag_doc, free_port, stop
from test_faults import AUTH, SLOW_TO_ACCEPT, TOKENS, Traffic
from test_store_loss_fleet import admin, audit_actions, phase_in_redis, stable_flag
from waiting import wait_until

PROPAGATION_SAMPLES = 40
FREEZE_S = 3.0


@pytest.fixture(params=["sentinel", "cluster"])
def topology(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A deployment of the test's own: a failover changes it for good."""
    if request.param == "plain":
        yield Plain(request.getfixturevalue("restartable_redis"))
        return
    make = getattr(redis_topologies, request.param)
    with make(free_port) as deployment:
        yield Topology(request.param, deployment)


class Topology:
    """A Sentinel or Cluster deployment seen the same way as a plain Redis below."""

    def __init__(self, name: str, deployment: Any) -> None:
        self.name, self.deployment = name, deployment
        self.url = deployment.url

    def client(self) -> Any:
        return self.deployment.client()

    def freeze(self, key: str, seconds: float) -> None:
        if isinstance(self.deployment, redis_topologies.Sentinel):
            self.deployment.freeze_master(seconds)
        else:
            self.deployment.freeze_master_of(key, seconds)


class Plain:
    """The plain redis-server of `restartable_redis`."""

    name = "plain"

    def __init__(self, handle: Any) -> None:
        self.handle, self.url = handle, handle.url

    def client(self) -> Any:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def freeze(self, key: str, seconds: float) -> None:
        pid = self.handle.executor.process.pid
        os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(pid, signal.SIGCONT)


class AdminWriter:
    """Creates flags `w0`, `w1`, ... through a gateway's admin API, one after the other, until
    stopped; keeps which were acknowledged (201) and what else came back."""

    def __init__(self, gw: Any, upstream: str) -> None:
        self.gw, self.upstream = gw, upstream
        self.acked: list[str] = []
        self.refused: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AdminWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            key = f"w{i}"
            try:
                r = admin(
                    self.gw, "PUT", f"/admin/flags/{key}", json=stable_flag(key, self.upstream)
                )
            except httpx.TransportError:
                self.refused.append(0)
                continue
            if r.status_code == 201:
                self.acked.append(key)
                i += 1
            elif r.status_code == 428:  # applied, but the answer was lost: not acknowledged
                i += 1
            else:
                self.refused.append(r.status_code)
            time.sleep(0.01)


def fail_over(topology: Topology, prefix: str) -> tuple[int, int]:
    if isinstance(topology.deployment, redis_topologies.Sentinel):
        return topology.deployment.failover()
    return topology.deployment.kill_master_of(f"{{{prefix}}}:flags")


def test_failover_under_load_loses_no_request_no_write_and_no_rollback(
    topology: Any,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    prefix = scratch_redis_prefix
    stable, canary = model_server("v1"), model_server("v2")
    # The resync far out: after the failover only pub/sub can carry a change between replicas.
    settings = {"store": {"kind": "redis", "url": topology.url, "prefix": prefix,
                          "resync_interval_s": 60}}  # fmt: skip
    doc = flag_doc(stable.url, canary.url, weight=0.5, on_canary_error="fallback",
                   guard=SLOW_TO_ACCEPT)  # fmt: skip
    a = gateway_server(doc, settings=settings, env=TOKENS)
    b = gateway_server(None, settings=settings, env=TOKENS)
    client = topology.client()
    wait_until(lambda: phase_in_redis(client, prefix) == "running", "the rollout to start")

    with (
        Traffic(a.url, workers=2, pause_s=0.005) as on_a,
        Traffic(b.url, workers=2, pause_s=0.005) as on_b,
        AdminWriter(a, stable.url) as writer,
    ):
        on_a.wait_for(50)
        on_b.wait_for(50)
        wait_until(lambda: len(writer.acked) >= 5, "admin writes")
        stop(canary.process)  # the guard rolls it back while the failover runs
        old, new = fail_over(topology, prefix)
        client = topology.client()
        wait_until(lambda: phase_in_redis(client, prefix) == "rolled_back",
                   "the rollback on the new master", within_s=30)  # fmt: skip
        acked_at_failover = len(writer.acked)
        wait_until(lambda: len(writer.acked) >= acked_at_failover + 5, "writes after failover",
                   within_s=30)  # fmt: skip
        on_a.wait_for(50)
        on_b.wait_for(50)

    failures = on_a.failures() + on_b.failures()
    answers = len(on_a.answers) + len(on_b.answers)
    print(f"{topology.name} failover {old} -> {new}: {answers} answers, "
          f"{len(failures)} failed; admin writes acknowledged {len(writer.acked)}, "
          f"refused {len(writer.refused)} {sorted(set(writer.refused))}")  # fmt: skip
    assert failures == []
    stored = client.smembers(f"{{{prefix}}}:flags")
    lost = [key for key in writer.acked if key not in stored]
    assert lost == [], f"acknowledged writes missing on the new master: {lost}"
    rollbacks = audit_actions(client, prefix, "rollback")
    assert len(rollbacks) == 1, rollbacks
    assert rollbacks[0]["actor"] == "guard"
    for gw in (a, b):
        r = admin(gw, "GET", "/admin/flags/sentiment/status")
        assert r.json()["state"] == "rolled_back"

    # Pub/sub after the failover: a change written through A shows on B. Measured from the PUT's
    # answer (the script publishes before it answers) to B's snapshot holding the new version,
    # polled over one kept-alive connection: an upper bound on the propagation.
    probe = stable_flag("probe", stable.url)
    assert admin(a, "PUT", "/admin/flags/probe", json=probe).status_code == 201
    delays = []
    with httpx.Client(base_url=b.admin_url, headers=AUTH, timeout=10) as poll:

        def version_on_b() -> int:
            r = poll.get("/admin/assign", params={"flag": "probe", "unit": "u"})
            return int(r.json()["version"]) if r.status_code == 200 else 0

        for version in range(1, PROPAGATION_SAMPLES + 1):
            methods = ["POST"] if version % 2 else ["POST", "PUT"]
            changed = {**probe, "route": {"path_prefix": "/v1/probe", "methods": methods}}
            headers = {"if-match": str(version)}
            r = admin(a, "PUT", "/admin/flags/probe", json=changed, headers=headers)
            assert r.status_code == 200, r.text
            acked = time.monotonic()
            deadline = acked + 20
            while version_on_b() != version + 1:  # polled back to back: ~1 ms resolution
                assert time.monotonic() < deadline, f"version {version + 1} never reached B"
            delays.append(time.monotonic() - acked)
    delays.sort()
    p50, p99 = delays[len(delays) // 2], delays[min(len(delays) - 1, int(0.99 * len(delays)))]
    print(f"{topology.name} pub/sub after failover: p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms over {len(delays)} changes")  # fmt: skip


def test_a_flushed_store_is_restored_once_under_load(
    topology: Any,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    """FLUSHALL on the master(s) while the replicas serve: the same loss as an empty restart."""
    prefix = scratch_redis_prefix
    stable, canary = model_server("v1"), model_server("v2")
    settings = {"store": {"kind": "redis", "url": topology.url, "prefix": prefix,
                          "resync_interval_s": 0.5}}  # fmt: skip
    doc = flag_doc(stable.url, canary.url, weight=0.5)
    fleet = [gateway_server(doc if i == 0 else None, settings=settings, env=TOKENS)
             for i in range(3)]  # fmt: skip
    client = topology.client()
    wait_until(lambda: phase_in_redis(client, prefix) == "running", "the rollout to start")
    r = admin(fleet[1], "POST", "/admin/flags/sentiment/rollback", json={"reason": "bad"})
    assert r.status_code == 200, r.text
    for gw in fleet:
        wait_until(lambda gw=gw: admin(gw, "GET", "/admin/flags/sentiment/status").json()["state"]
                   == "rolled_back", "every replica to see the rollback")  # fmt: skip
    time.sleep(2)  # a few timed resyncs: every replica's image has been read in full since

    traffic = [Traffic(gw.url, workers=1, pause_s=0.005) for gw in fleet]
    for t in traffic:
        t.__enter__()
    try:
        for t in traffic:
            t.wait_for(30)
        client.flushall()
        wait_until(lambda: len(audit_actions(client, prefix, "store_restored")) >= 1,
                   "the restore", within_s=30)  # fmt: skip
        for t in traffic:
            t.wait_for(100)
    finally:
        for t in traffic:
            t.stop()
    failures = [f for t in traffic for f in t.failures()]
    print(f"{topology.name} flushed: {sum(len(t.answers) for t in traffic)} answers, "
          f"{len(failures)} failed")  # fmt: skip
    assert failures == []
    assert sum(t.count("v2") for t in traffic) == 0
    assert len(audit_actions(client, prefix, "store_restored")) == 1
    assert phase_in_redis(client, prefix) == "rolled_back"


@pytest.mark.parametrize("topology", ["plain", "sentinel", "cluster"], indirect=True)
def test_a_frozen_master_costs_no_request(
    topology: Any,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    """SIGSTOP the master 3 s under load, then SIGCONT (Sentinel and Cluster fail over while it
    is frozen): no request fails, and the store takes writes again afterwards."""
    prefix = scratch_redis_prefix
    stable, canary = model_server("v1"), model_server("v2")
    settings = {"store": {"kind": "redis", "url": topology.url, "prefix": prefix,
                          "resync_interval_s": 0.5}}  # fmt: skip
    gw = gateway_server(flag_doc(stable.url, canary.url, weight=0.5), settings=settings,
                        env=TOKENS)  # fmt: skip
    with Traffic(gw.url, workers=4, pause_s=0.005) as traffic:
        traffic.wait_for(100)
        topology.freeze(f"{{{prefix}}}:flags", FREEZE_S)
        traffic.wait_for(100)
        probe = stable_flag("probe", stable.url)
        wait_until(lambda: admin(gw, "PUT", "/admin/flags/probe", json=probe).status_code
                   in (201, 428), "a write to succeed again", within_s=60)  # fmt: skip
        traffic.wait_for(100)
    print(f"{topology.name} frozen {FREEZE_S} s: {len(traffic.answers)} answers, "
          f"{len(traffic.failures())} failed")  # fmt: skip
    assert traffic.failures() == []
    assert traffic.count("v2") > 0  # the canary still served: nothing was rolled back
