"""Store loss with real processes (DESIGN 7 and 10): a real redis-server killed and restarted
empty under load, gateways that start while Redis is unreachable, a rollback decided during an
outage that survives a replica restart, and deleting every flag, which is not a loss.

Real gateways (`gateway serve`), real model servers, a real redis-server that the test kills
with SIGKILL or stops, on free loopback ports.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
from conftest import flag_doc, stop
from scrape import metric
from test_faults import AUTH, SLOW_TO_ACCEPT, TOKENS, Traffic, status
from waiting import wait_until

RESYNC_S = 0.5  # the timed resync, lowered so a 15 s load spans many of them
LOAD_S = 15.0


def store_settings(url: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {"store": {"kind": "redis", "url": url, "prefix": prefix, "resync_interval_s": RESYNC_S,
                      **extra}}  # fmt: skip


def admin(gw: Any, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{gw.admin_url}{path}", headers={**AUTH, **kw.pop("headers", {})},
                         timeout=10, **kw)  # fmt: skip


def stable_flag(key: str, upstream: str) -> dict[str, Any]:
    return {"key": key, "route": {"path_prefix": f"/v1/{key}"},
            "stable": {"name": "v1", "upstream": upstream}}  # fmt: skip


def last_sync(gw: Any) -> float:
    """When the replica last confirmed its snapshot against the store (wall clock)."""
    return time.time() - metric(gw, "gateway_flag_store_sync_age_seconds")


def audit_actions(raw: redis.Redis, prefix: str, action: str) -> list[dict[str, str]]:
    entries = raw.xrange(f"{{{prefix}}}:audit")
    return [fields for _, fields in entries if fields["action"] == action]  # type: ignore[union-attr]


def phase_in_redis(raw: redis.Redis, prefix: str, key: str = "sentiment") -> str | None:
    state = raw.hget(f"{{{prefix}}}:rollout:{key}", "state")
    return None if state is None else str(json.loads(state)["phase"])  # type: ignore[arg-type]


def without_persistence(raw: redis.Redis) -> None:
    """Make the next start of this redis-server an empty one: no save on exit, no dump file."""
    raw.config_set("save", "")
    raw.config_set("appendonly", "no")
    directory, name = raw.config_get("dir")["dir"], raw.config_get("dbfilename")["dbfilename"]
    (Path(directory) / name).unlink(missing_ok=True)


def test_redis_killed_and_restarted_empty_under_load_costs_nothing(
    restartable_redis: Any,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    prefix = scratch_redis_prefix
    stable, canary = model_server("v1"), model_server("v2")
    settings = store_settings(restartable_redis.url, prefix)
    doc = flag_doc(stable.url, canary.url, weight=0.5)
    fleet = [gateway_server(doc if i == 0 else None, settings=settings, env=TOKENS)
             for i in range(3)]  # fmt: skip
    raw = redis.Redis.from_url(restartable_redis.url, decode_responses=True)

    # A second flag at version 2, and the canary rolled back by an operator.
    toxicity = stable_flag("toxicity", stable.url)
    assert admin(fleet[1], "PUT", "/admin/flags/toxicity", json=toxicity).status_code == 201
    replaced = {**toxicity, "route": {"path_prefix": "/v1/toxicity", "methods": ["POST"]}}
    r = admin(fleet[1], "PUT", "/admin/flags/toxicity", json=replaced, headers={"if-match": "1"})
    assert r.status_code == 200, r.text
    wait_until(lambda: phase_in_redis(raw, prefix) == "running", "the rollout to start")
    r = admin(fleet[2], "POST", "/admin/flags/sentiment/rollback", json={"reason": "bad canary"})
    assert r.status_code == 200, r.text
    for gw in fleet:
        wait_until(lambda gw=gw: status(gw)["state"] == "rolled_back", "every replica to see it")
    time.sleep(3 * RESYNC_S)  # every replica's image has been read in full since the rollback
    without_persistence(raw)

    traffic = [Traffic(gw.url, workers=2, pause_s=0.005) for gw in fleet]
    traffic += [Traffic(fleet[0].url, workers=1, pause_s=0.005, path="/v1/toxicity")]
    for t in traffic:
        t.__enter__()
    try:
        for t in traffic:
            t.wait_for(50)
        restartable_redis.executor.kill(sig=signal.SIGKILL)
        for gw in fleet:
            wait_until(lambda gw=gw: metric(gw, "gateway_flag_store_up") == 0.0, "the outage")
        restartable_redis.start()
        assert raw.dbsize() == 0 or raw.exists(f"{{{prefix}}}:meta")  # empty, or restored
        restarted_at = time.monotonic()
        while time.monotonic() - restarted_at < LOAD_S:
            for t in traffic:
                t.wait_for(10, within_s=30)
    finally:
        for t in traffic:
            t.stop()

    answers = sum(len(t.answers) for t in traffic)
    failures = [f for t in traffic for f in t.failures()]
    print(f"restart empty: {answers} answers, {len(failures)} failed")
    assert failures == []
    assert sum(t.count("v2") for t in traffic) == 0  # the rolled-back canary got nothing
    restored = audit_actions(raw, prefix, "store_restored")
    assert len(restored) == 1, restored
    restores = [metric(gw, "gateway_flag_store_restores_total") for gw in fleet]
    assert sorted(restores) == [0.0, 0.0, 1.0]
    assert phase_in_redis(raw, prefix) == "rolled_back"
    assert raw.hget(f"{{{prefix}}}:flag:toxicity", "version") == "2"
    assert raw.hget(f"{{{prefix}}}:flag:sentiment", "version") == "1"
    for gw in fleet:
        assert status(gw)["state"] == "rolled_back"
        listed = admin(gw, "GET", "/admin/flags").json()
        assert {f["key"]: f["version"] for f in listed["flags"]} == {"sentiment": 1, "toxicity": 2}


def test_a_gateway_started_while_redis_is_unreachable_serves_its_snapshot_file(
    restartable_redis: Any,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    prefix = scratch_redis_prefix
    stable = model_server("v1")
    snapshot = tmp_path / "state" / "snapshot.json"
    settings = store_settings(restartable_redis.url, prefix, snapshot_file=str(snapshot))
    first = gateway_server(None, settings=settings, env=TOKENS)
    snap = stable_flag("snap", stable.url)
    assert admin(first, "PUT", "/admin/flags/snap", json=snap).status_code == 201
    moved = {**snap, "route": {"path_prefix": "/v1/snap", "methods": ["POST"]}}
    assert admin(first, "PUT", "/admin/flags/snap", json=moved,
                 headers={"if-match": "1"}).status_code == 200  # fmt: skip
    wait_until(lambda: '"version":"2"' in snapshot.read_text(errors="replace")
               if snapshot.exists() else False, "the snapshot file")  # fmt: skip
    stop(first.server.process)
    restartable_redis.stop()

    # The flags file names another flag: the snapshot, not the file, is what it serves.
    other = {"flags": [stable_flag("file", stable.url)]}
    gw = gateway_server(other, settings=settings, env=TOKENS)
    assert httpx.post(f"{gw.url}/v1/snap", content=b"{}").status_code == 200
    assert httpx.post(f"{gw.url}/v1/file", content=b"{}").status_code == 404
    listed = admin(gw, "GET", "/admin/flags")
    assert listed.status_code == 200, listed.text
    assert listed.headers["x-gateway-stale"].startswith("sync-age=")
    assert listed.json()["stale"]["sync_age_s"] >= 0
    assert [(f["key"], f["version"]) for f in listed.json()["flags"]] == [("snap", 2)]
    one = admin(gw, "GET", "/admin/flags/snap")
    assert (one.status_code, one.headers["etag"], "stale" in one.json()) == (200, '"2"', True)
    refused = admin(gw, "PUT", "/admin/flags/snap", json=snap, headers={"if-match": "2"})
    assert refused.status_code == 503
    assert "nothing was written" in refused.json()["message"]

    restartable_redis.start()  # it kept its data (stopped with SIGTERM): nothing to restore
    wait_until(lambda: metric(gw, "gateway_flag_store_up") == 1.0, "the store back", within_s=20)
    wait_until(lambda: "stale" not in admin(gw, "GET", "/admin/flags").json(), "fresh reads")
    # The flags file only adds what the store lacks, once Redis answers.
    wait_until(lambda: httpx.post(f"{gw.url}/v1/file", content=b"{}").status_code == 200,
               "the flags file seeded")  # fmt: skip
    raw = redis.Redis.from_url(restartable_redis.url, decode_responses=True)
    assert raw.hget(f"{{{prefix}}}:flag:snap", "version") == "2"
    assert audit_actions(raw, prefix, "store_restored") == []


def test_a_gateway_started_with_neither_redis_nor_a_snapshot_serves_the_flags_file(
    restartable_redis: Any,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    stable = model_server("v1")
    restartable_redis.stop()
    settings = store_settings(restartable_redis.url, scratch_redis_prefix)
    gw = gateway_server({"flags": [stable_flag("file", stable.url)]}, settings=settings,
                        env=TOKENS)  # fmt: skip
    r = httpx.post(f"{gw.url}/v1/file", content=b"{}")
    assert (r.status_code, r.headers["x-gateway-variant"]) == (200, "v1")
    listed = admin(gw, "GET", "/admin/flags")
    assert listed.headers["x-gateway-stale"] == "sync-age=unknown"
    assert listed.json()["stale"] == {"sync_age_s": None}
    assert listed.json()["flags"] == []  # nothing is known of the store yet

    restartable_redis.start()
    raw = redis.Redis.from_url(restartable_redis.url, decode_responses=True)
    wait_until(lambda: raw.hget(f"{{{scratch_redis_prefix}}}:flag:file", "version") == "1",
               "the flags file seeded into the store", within_s=20)  # fmt: skip


def test_a_rollback_decided_during_an_outage_survives_a_replica_restart(
    restartable_redis: Any,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    prefix = scratch_redis_prefix
    stable, canary = model_server("v1"), model_server("v2")
    snapshot = tmp_path / "snapshot.json"
    settings = store_settings(restartable_redis.url, prefix, snapshot_file=str(snapshot))
    doc = flag_doc(stable.url, canary.url, weight=0.5, on_canary_error="fallback",
                   guard=SLOW_TO_ACCEPT)  # fmt: skip
    gw = gateway_server(doc, settings=settings, env=TOKENS)
    raw = redis.Redis.from_url(restartable_redis.url, decode_responses=True)
    wait_until(lambda: phase_in_redis(raw, prefix) == "running", "the rollout to start")

    with Traffic(gw.url, workers=4, pause_s=0.005) as traffic:
        traffic.wait_for(50)
        restartable_redis.stop()  # SIGTERM: Redis keeps its data
        wait_until(lambda: metric(gw, "gateway_flag_store_up") == 0.0, "the outage reported")
        stop(canary.process)  # the canary dies: the guard rolls it back, locally
        wait_until(lambda: status(gw)["state"] == "rolled_back", "the guard to reject")
        wait_until(lambda: "sentiment" in json.loads(snapshot.read_text())["pending_rollbacks"],
                   "the rollback in the snapshot file")  # fmt: skip
    assert traffic.failures() == []

    # The replica restarts while Redis is still away: it must not forget the rollback.
    port, admin_port = gw.server.port, gw.admin_port
    stop(gw.server.process)
    again = gateway_server(doc, settings=settings, env=TOKENS, port=port, admin_port=admin_port)
    assert status(again)["state"] == "rolled_back"
    with Traffic(again.url, workers=2, pause_s=0.005) as after:
        after.wait_for(100)
        restartable_redis.start()
        wait_until(lambda: phase_in_redis(raw, prefix) == "rolled_back",
                   "the rollback written to Redis", within_s=20)  # fmt: skip
        after.wait_for(100)
    assert after.failures() == []
    assert after.count("v2") == 0
    rollbacks = audit_actions(raw, prefix, "rollback")
    assert len(rollbacks) == 1, rollbacks
    assert (rollbacks[0]["actor"], rollbacks[0]["reason"]) == ("guard", "sprt")
    wait_until(lambda: json.loads(snapshot.read_text())["pending_rollbacks"] == {},
               "the snapshot file to say it is written")  # fmt: skip


def test_deleting_every_flag_is_not_a_loss(
    restartable_redis: Any,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    prefix = scratch_redis_prefix
    stable = model_server("v1")
    settings = store_settings(restartable_redis.url, prefix)
    flags = {"flags": [stable_flag("a", stable.url), stable_flag("b", stable.url)]}
    fleet = [gateway_server(flags, settings=settings, env=TOKENS) for _ in range(2)]
    raw = redis.Redis.from_url(restartable_redis.url, decode_responses=True)
    for key in ("a", "b"):
        r = admin(fleet[0], "DELETE", f"/admin/flags/{key}", headers={"if-match": "1"})
        assert r.status_code == 204, r.text
    for gw in fleet:
        wait_until(lambda gw=gw: httpx.post(f"{gw.url}/v1/a", content=b"{}").status_code == 404
                   and httpx.post(f"{gw.url}/v1/b", content=b"{}").status_code == 404,
                   "the deletes on every replica")  # fmt: skip
    # Two full timed resyncs later on every replica: still deleted, nothing restored.
    for _ in range(2):
        since = time.time()
        for gw in fleet:
            wait_until(lambda gw=gw, since=since: last_sync(gw) > since, "a timed resync")
    assert raw.smembers(f"{{{prefix}}}:flags") == set()
    assert raw.exists(f"{{{prefix}}}:meta") == 1
    assert audit_actions(raw, prefix, "store_restored") == []
    assert [metric(gw, "gateway_flag_store_restores_total") for gw in fleet] == [0.0, 0.0]
    assert [admin(gw, "GET", "/admin/flags").json()["flags"] for gw in fleet] == [[], []]
