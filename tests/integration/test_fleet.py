"""Several gateway replicas on one real Redis: edits propagate, compare-and-set holds, a Redis
outage costs no request, the guard stops a bad canary fleet-wide, state survives restarts, and
shadow statistics merge across replicas."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import flag_doc
from scipy import stats
from waiting import wait_until

OPERATOR = "ops-token-123456"
TOKENS = {"GATEWAY_ADMIN_TOKENS": f"ops:operator:{OPERATOR}"}
AUTH = {"authorization": f"Bearer {OPERATOR}"}


def redis_settings(url: str, prefix: str, **store: Any) -> dict[str, Any]:
    return {"store": {"kind": "redis", "url": url, "prefix": prefix, **store}}


def put_flag(admin_url: str, document: dict[str, Any], version: int | None) -> httpx.Response:
    headers = dict(AUTH)
    if version is not None:
        headers["if-match"] = str(version)
    return httpx.put(f"{admin_url}/admin/flags/{document['key']}", json=document, headers=headers)


def get_flag(admin_url: str, key: str = "sentiment") -> dict[str, Any]:
    r = httpx.get(f"{admin_url}/admin/flags/{key}", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def status(gw: Any, key: str = "sentiment") -> dict[str, Any]:
    r = httpx.get(f"{gw.admin_url}/admin/flags/{key}/status", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def test_edits_propagate_to_every_replica(
    redis_url: str,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    a, b = model_server("a"), model_server("b")
    settings = redis_settings(redis_url, scratch_redis_prefix)
    doc = flag_doc(a.url, None)
    first = gateway_server(doc, settings=settings, env=TOKENS)
    replicas = [first] + [gateway_server(settings=settings, env=TOKENS) for _ in range(2)]
    flag = doc["flags"][0]
    delays: list[float] = []
    clients = [httpx.Client(base_url=gw.url) for gw in replicas]
    try:
        for edit in range(50):
            name, url = ("b", b.url) if edit % 2 == 0 else ("a", a.url)
            version = get_flag(first.admin_url)["version"]
            flag["stable"] = {"name": name, "upstream": url}
            writer = replicas[edit % 3]
            r = put_flag(writer.admin_url, flag, version)
            assert r.status_code == 200, r.text
            acknowledged = time.monotonic()
            for client in clients:
                wait_until(
                    lambda c=client, n=name: (
                        c.get("/v1/sentiment").headers["x-gateway-variant"] == n
                    ),
                    f"edit {edit} served by every replica",
                )
                delays.append(time.monotonic() - acknowledged)
    finally:
        for client in clients:
            client.close()
    delays.sort()
    p50, p99 = statistics.median(delays), delays[int(len(delays) * 0.99) - 1]
    print(
        f"propagation over {len(delays)} replica-edits: p50 {p50 * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms"
    )
    assert len(delays) == 150


def test_concurrent_puts_with_one_version_let_exactly_one_win(
    redis_url: str,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    a = model_server("a")
    settings = redis_settings(redis_url, scratch_redis_prefix)
    replicas = [gateway_server(flag_doc(a.url, None), settings=settings, env=TOKENS)]
    replicas.append(gateway_server(settings=settings, env=TOKENS))
    base = get_flag(replicas[0].admin_url)
    version = base["version"]

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:
            requests = []
            for i in range(20):
                document = {**base["document"], "salt": f"writer-{i}"}
                url = f"{replicas[i % 2].admin_url}/admin/flags/sentiment"
                requests.append(
                    client.put(url, json=document, headers={**AUTH, "if-match": str(version)})
                )
            return await asyncio.gather(*requests)

    answers = asyncio.run(race())
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [409] * 19, codes
    winner = next(r for r in answers if r.status_code == 200).json()
    stored = get_flag(replicas[1].admin_url)
    assert stored["version"] == version + 1
    assert stored["document"]["salt"] == winner["document"]["salt"]
    events = httpx.get(
        f"{replicas[0].admin_url}/admin/audit", params={"flag": "sentiment"}, headers=AUTH
    ).json()["events"]
    assert [e["version_after"] for e in events].count(version + 1) == 1


def test_redis_outage_costs_no_request_and_refuses_writes(
    restartable_redis: Any,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    a, b = model_server("a"), model_server("b")
    settings = redis_settings(restartable_redis.url, scratch_redis_prefix, resync_interval_s=0.5)
    doc = flag_doc(a.url, b.url, weight=0.2)
    gw = gateway_server(doc, settings=settings, env=TOKENS)
    failures: list[int] = []
    served = 0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal served
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            while not stop.is_set() or served < 2000:
                r = client.post("/v1/sentiment", content=b"{}", headers={"x-user-id": f"u{served}"})
                served += 1
                if r.status_code != 200:
                    failures.append(r.status_code)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        wait_until(lambda: served >= 100, "traffic before the outage")
        restartable_redis.stop()
        version = 1
        r = put_flag(gw.admin_url, doc["flags"][0], version)
        assert r.status_code == 503, r.text
        assert "nothing was written" in r.json()["message"]
        wait_until(
            lambda: "gateway_flag_store_up 0.0" in httpx.get(f"{gw.admin_url}/metrics").text,
            "the gateway to report the store down",
        )
        restartable_redis.start()
        deadline = time.monotonic() + 10
        while "gateway_flag_store_up 1.0" not in httpx.get(f"{gw.admin_url}/metrics").text:
            assert time.monotonic() < deadline, "the gateway never saw Redis come back"
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join()
    assert served >= 2000
    assert failures == []
    edited = {**doc["flags"][0], "salt": "after-the-outage"}
    r = put_flag(gw.admin_url, edited, get_flag(gw.admin_url)["version"])
    assert r.status_code == 200, r.text


def test_missed_change_message_is_repaired_by_the_timed_resync(
    redis_url: str,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    a, b = model_server("a"), model_server("b")
    settings = redis_settings(redis_url, scratch_redis_prefix, resync_interval_s=0.5)
    doc = flag_doc(a.url, None)
    gw = gateway_server(doc, settings=settings, env=TOKENS)
    stored = get_flag(gw.admin_url)
    # Write the next version the way the store does, but publish nothing.
    document = {**stored["document"], "stable": {"name": "b", "upstream": b.url}}
    raw = redis.Redis.from_url(redis_url)
    raw.hset(
        f"{{{scratch_redis_prefix}}}:flag:sentiment",
        mapping={"doc": json.dumps(document), "version": stored["version"] + 1},
    )
    deadline = time.monotonic() + 5
    with httpx.Client(base_url=gw.url) as client:
        while client.get("/v1/sentiment").headers["x-gateway-variant"] != "b":
            assert time.monotonic() < deadline, "the resync never repaired the missed change"
            time.sleep(0.05)


def test_bad_canary_stops_on_every_replica_within_100_ms(
    redis_url: str,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    stable = model_server("v1")
    log = tmp_path / "canary.jsonl"
    canary = model_server("v2", error_rate=0.2, seed=3, access_log=log)
    settings = redis_settings(redis_url, scratch_redis_prefix)
    # A stricter alpha puts A at ln(0.9/1e-4) = 9.1: some 40 canary answers, so that every
    # replica is sending the canary traffic when the guard decides.
    doc = flag_doc(stable.url, canary.url, weight=0.5, guard={"alpha": 0.0001})
    replicas = [gateway_server(doc, settings=settings, env=TOKENS)]
    replicas += [gateway_server(settings=settings, env=TOKENS) for _ in range(2)]

    async def traffic() -> None:
        async with httpx.AsyncClient(timeout=10) as client:

            async def worker(r: int, w: int) -> None:
                for i in range(150):
                    url = f"{replicas[r].url}/v1/sentiment/replica-{r}"
                    await client.post(url, content=b"{}", headers={"x-user-id": f"{r}-{w}-{i}"})

            await asyncio.gather(*(worker(r, w) for r in range(3) for w in range(4)))

    asyncio.run(traffic())
    s = status(replicas[0])
    assert s["state"] == "rolled_back" and s["reason"] == "sprt", s
    events = httpx.get(
        f"{replicas[0].admin_url}/admin/audit", params={"flag": "sentiment"}, headers=AUTH
    ).json()["events"]
    rollbacks = [e for e in events if e["action"] == "rollback"]
    assert len(rollbacks) == 1, rollbacks
    decided = rollbacks[0]["ts"]
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    last = {}
    for r in range(3):
        times = [x["ts"] for x in lines if x.get("path", "").endswith(f"replica-{r}")]
        if times:
            last[r] = max(times) - decided
    assert len(last) >= 2, f"only replicas {sorted(last)} sent the canary anything"
    worst = max(last.values())
    print(
        f"last canary request after the rollback decision, per replica (ms): "
        f"{ {r: round(v * 1000, 1) for r, v in last.items()} }, worst {worst * 1000:.1f} ms"
    )
    assert worst <= 0.100
    for gw in replicas:
        assert status(gw)["state"] == "rolled_back"


def test_rollout_survives_a_gateway_restart(
    redis_url: str,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    settings = redis_settings(redis_url, scratch_redis_prefix)
    steps = [{"weight": 0.1, "hold": "1s"}, {"weight": 0.5, "hold": "1h"}]
    doc = flag_doc(
        v1.url, v2.url, schedule={"kind": "step", "steps": steps}, advance_requires_evidence=False
    )
    gw = gateway_server(doc, settings=settings, env=TOKENS)
    deadline = time.monotonic() + 10
    while status(gw)["step"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started_at = status(gw)["started_at"]
    gw.server.process.terminate()
    assert gw.server.process.wait(timeout=15) == 0
    again = gateway_server(doc, settings=settings, env=TOKENS)
    s = status(again)
    assert (s["state"], s["step"], s["weight"], s["started_at"]) == ("running", 1, 0.5, started_at)
    r = httpx.post(
        f"{again.admin_url}/admin/flags/sentiment/rollback",
        headers=AUTH,
        json={"reason": "restart test"},
    )
    assert r.status_code == 200
    again.server.process.terminate()
    assert again.server.process.wait(timeout=15) == 0
    third = gateway_server(doc, settings=settings, env=TOKENS)
    s = status(third)
    assert s["state"] == "rolled_back" and s["weight"] == 0.0
    with httpx.Client(base_url=third.url) as client:
        variants = {
            client.get("/v1/sentiment", headers={"x-user-id": f"u{i}"}).headers["x-gateway-variant"]
            for i in range(50)
        }
    assert variants == {"v1"}


def test_shadow_statistics_merge_across_replicas(
    redis_url: str,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    primary = model_server("v1", seed=5)
    shadow = model_server("v3", seed=6, score_offset=0.05)
    doc = flag_doc(primary.url, None)
    doc["flags"][0]["shadows"] = [
        {"name": "v3", "upstream": shadow.url, "sample": 1.0, "metric": "json:/score"}
    ]
    logs = [tmp_path / "pairs-0.jsonl", tmp_path / "pairs-1.jsonl"]
    replicas = [
        gateway_server(
            doc if i == 0 else None,
            settings={
                **redis_settings(redis_url, scratch_redis_prefix),
                "shadow": {"pair_log": str(logs[i])},
            },
            env=TOKENS,
        )
        for i in range(2)
    ]
    with httpx.Client() as client:
        for i in range(300):
            gw = replicas[i % 2]
            r = client.post(f"{gw.url}/v1/sentiment", content=f'{{"i": {i}}}'.encode())
            assert r.status_code == 200
    deadline = time.monotonic() + 10
    while True:
        pairs = [json.loads(x) for path in logs for x in path.read_text().splitlines() if x]
        merged = [status(gw)["shadows"][0] for gw in replicas]
        settled = all(m["n"] == m["wilcoxon"]["pairs"] == 300 for m in merged)
        if len(pairs) == 300 and settled:
            break
        assert time.monotonic() < deadline, (len(pairs), [m["n"] for m in merged])
        time.sleep(0.1)
    oracle = stats.ttest_rel(
        [p["shadow_value"] for p in pairs], [p["primary_value"] for p in pairs]
    )
    # The Wilcoxon test ranks both replicas' pairs, read from the store's pairs stream.
    signed_rank = stats.wilcoxon([p["d"] for p in pairs])
    for m in merged:
        assert m["t"] == pytest.approx(float(oracle.statistic), rel=1e-9)
        assert m["p"] == pytest.approx(float(oracle.pvalue), rel=1e-6, abs=1e-300)
        assert m["mean_diff"] == pytest.approx(statistics.fmean(p["d"] for p in pairs), rel=1e-9)
        assert (m["wilcoxon"]["pairs"], m["wilcoxon"]["pairs_from"]) == (300, "store")
        assert m["wilcoxon"]["p"] == pytest.approx(float(signed_rank.pvalue), rel=1e-9)
    # Both replicas mix with the one tau the store froze at its first 100 pairs.
    assert merged[0]["tau"] == merged[1]["tau"] is not None
    assert merged[0]["cs95"] == pytest.approx(merged[1]["cs95"], rel=1e-12)


def test_workers_share_ports_and_metrics(
    redis_url: str,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    a = model_server("a")
    settings = redis_settings(redis_url, scratch_redis_prefix)
    gw = gateway_server(
        flag_doc(a.url, None), settings=settings, args=["--workers", "2"], env=TOKENS
    )
    pids = set()
    with httpx.Client(base_url=gw.url) as client:
        for i in range(200):
            # A new connection each time, so the kernel spreads them over both workers.
            r = client.get("/v1/sentiment", headers={"x-user-id": f"u{i}", "connection": "close"})
            assert r.status_code == 200
    deadline = time.monotonic() + 5
    while len(pids) < 2 and time.monotonic() < deadline:
        pids.add(httpx.get(f"{gw.admin_url}/readyz", headers={"connection": "close"}).json()["pid"])
    assert len(pids) == 2, "both workers answer on the shared admin port"
    metrics = httpx.get(f"{gw.admin_url}/metrics").text
    line = 'gateway_requests_total{code="200",flag="sentiment",variant="v1"}'
    total = sum(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith(line))
    assert total == 200, "the scrape sums every worker's counts"


def test_memory_store_refuses_several_workers(tmp_path: Path) -> None:
    from conftest import GATEWAY_BIN

    run = subprocess.run(
        [str(GATEWAY_BIN), "serve", "--workers", "2", "--port", "0", "--admin-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 1
    assert "need a shared flag store" in run.stderr and "--redis-url" in run.stderr
