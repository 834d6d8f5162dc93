"""The rollout lifecycle's reproductions, each on a real `gateway serve` with real model servers:
promotion keeps routing, a promotion that cannot validate is refused, creates race on Redis,
an overflowing hold is refused, a change that cannot be applied leaves the previous snapshot,
and an operator's reason reaches the audit."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from conftest import flag_doc
from waiting import keeps_for

OPERATOR = "ops-token-123456"
TOKENS = {"GATEWAY_ADMIN_TOKENS": f"ops:operator:{OPERATOR}"}
AUTH = {"authorization": f"Bearer {OPERATOR}"}
TO_CANARY = [{"if": {"header": "x-canary", "equals": "always"}, "then": "canary"}]


def wait_for(what: Callable[[], Any], message: str, *, deadline_s: float = 30.0) -> Any:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"{message} (waited {deadline_s} s)")


def document(gw: Any, key: str = "sentiment") -> dict[str, Any]:
    r = httpx.get(f"{gw.admin_url}/admin/flags/{key}", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def audit(gw: Any, key: str = "sentiment") -> list[dict[str, Any]]:
    r = httpx.get(f"{gw.admin_url}/admin/audit", params={"flag": key}, headers=AUTH)
    assert r.status_code == 200, r.text
    return list(r.json()["events"])


def act(gw: Any, action: str, reason: str, key: str = "sentiment") -> httpx.Response:
    return httpx.post(
        f"{gw.admin_url}/admin/flags/{key}/{action}", headers=AUTH, json={"reason": reason}
    )


def traffic(gw: Any, n: int = 60) -> list[httpx.Response]:
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        return [
            client.post(
                "/v1/sentiment",
                content=b"{}",
                headers={"x-user-id": f"u{i}", **({"x-canary": "always"} if i % 2 else {})},
            )
            for i in range(n)
        ]


def metric(gw: Any, line_start: str) -> float | None:
    text = httpx.get(f"{gw.admin_url}/metrics").text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def redis_settings(url: str, prefix: str) -> dict[str, Any]:
    return {"store": {"kind": "redis", "url": url, "prefix": prefix, "resync_interval_s": 0.5}}


@pytest.fixture(params=["memory", "redis"])
def store_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    url = request.getfixturevalue("redis_url")
    return redis_settings(url, request.getfixturevalue("scratch_redis_prefix"))


def test_promotion_with_a_then_canary_rule_keeps_every_request_answered(
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
    store_settings: dict[str, Any],
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    flags = flag_doc(v1.url, v2.url, weight=0.5, rules=TO_CANARY)
    gw = gateway_server(flags, settings=store_settings, env=TOKENS)
    assert {r.status_code for r in traffic(gw)} == {200}
    assert act(gw, "promote", "v2 is good").status_code == 200

    def promoted() -> dict[str, Any] | None:
        doc = document(gw)["document"]
        return doc if "canary" not in doc else None

    doc = wait_for(promoted, "the promotion never rewrote the flag")
    assert doc["stable"]["name"] == "v2" and doc["rules"][0]["then"] == "stable"
    answers = traffic(gw)
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers][:3]
    assert {r.headers["x-gateway-variant"] for r in answers} == {"v2"}
    ready = httpx.get(f"{gw.admin_url}/readyz").json()
    assert ready["snapshot_problems"] == [] and ready["flags"] == 1
    events = [(e["actor"], e["action"]) for e in audit(gw)]
    assert events.count(("controller", "promote")) == 1, events
    assert "skipping flag" not in gw.server.log()


def test_promotion_that_would_not_validate_is_refused_and_the_canary_keeps_full_weight(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    # `then: v1` names the stable that a promotion retires: the promoted document is invalid
    rules = [{"if": {"header": "x-pin", "equals": "old"}, "then": "v1"}]
    gw = gateway_server(flag_doc(v1.url, v2.url, weight=0.5, rules=rules), env=TOKENS)
    assert act(gw, "promote", "ship it").status_code == 200
    blocked = wait_for(
        lambda: [e for e in audit(gw) if e["action"] == "promotion_blocked"],
        "the refused promotion was never audited",
    )
    # the controller ticks every 0.1 s and meets the refusal again each time: audited once
    keeps_for(
        lambda: len([e for e in audit(gw) if e["action"] == "promotion_blocked"]) == 1,
        "one promotion_blocked event",
        seconds=0.5,
    )
    assert "rules[0].then" in blocked[0]["reason"] and "'v1'" in blocked[0]["reason"]
    assert blocked[0]["details"]["errors"][0]["path"] == "rules[0].then"
    assert metric(gw, 'gateway_promotions_blocked_total{flag="sentiment"}') == 1.0
    stored = document(gw)
    assert stored["version"] == 1 and stored["document"]["canary"]["name"] == "v2"
    answers = traffic(gw, 40)
    assert {r.status_code for r in answers} == {200}
    assert {r.headers["x-gateway-variant"] for r in answers} == {"v2"}  # full weight
    # The operator fixes the rule: the promotion goes through.
    fixed = dict(stored["document"], rules=[])
    r = httpx.put(
        f"{gw.admin_url}/admin/flags/sentiment",
        json=fixed,
        headers={**AUTH, "If-Match": str(stored["version"])},
    )
    assert r.status_code == 200 and r.json()["rollout"] == "keeps", r.text
    wait_for(lambda: "canary" not in document(gw)["document"], "no promotion after the fix")


def test_parallel_creates_on_one_route_let_exactly_one_in(
    redis_url: str,
    scratch_redis_prefix: str,
    gateway_server: Callable[..., Any],
) -> None:
    settings = redis_settings(redis_url, scratch_redis_prefix)
    replicas = [gateway_server(settings=settings, env=TOKENS) for _ in range(2)]

    def create(i: int) -> int:
        doc = {
            "route": {"path_prefix": "/contended"},
            "stable": {"name": "v1", "upstream": "http://127.0.0.1:9"},
        }
        gw = replicas[i % 2]
        return httpx.put(
            f"{gw.admin_url}/admin/flags/racer-{i}", json=doc, headers=AUTH, timeout=30
        ).status_code

    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(create, range(20)))
        assert codes.count(201) == 1, codes
        assert all(code in (409, 422) for code in codes if code != 201), codes
        flags = httpx.get(f"{replicas[0].admin_url}/admin/flags", headers=AUTH).json()["flags"]
        assert len(flags) == 1
        winner = flags[0]
        r = httpx.delete(
            f"{replicas[0].admin_url}/admin/flags/{winner['key']}",
            headers={**AUTH, "If-Match": str(winner["version"])},
        )
        assert r.status_code == 204


def test_put_without_if_match_on_an_existing_flag_is_428_never_201(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1 = model_server("v1")
    gw = gateway_server(flag_doc(v1.url, None), env=TOKENS)
    doc = document(gw)["document"]
    r = httpx.put(f"{gw.admin_url}/admin/flags/sentiment", json=doc, headers=AUTH)
    assert r.status_code == 428, r.text
    r = httpx.put(
        f"{gw.admin_url}/admin/flags/sentiment", json=doc, headers={**AUTH, "If-Match": "1"}
    )
    assert r.status_code == 200 and r.json()["version"] == 2, r.text


def test_an_overflowing_hold_is_refused_and_status_keeps_answering(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    gw = gateway_server(flag_doc(v1.url, v2.url), env=TOKENS)
    doc = document(gw)["document"]
    doc["schedule"] = {"kind": "step", "steps": [{"weight": 0.1, "hold": "999999999999999999d"}]}
    r = httpx.put(
        f"{gw.admin_url}/admin/flags/sentiment", json=doc, headers={**AUTH, "If-Match": "1"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"] == [
        {
            "path": "schedule.steps[0].hold",
            "message": "must be at most 365d, got '999999999999999999d'",
        }
    ]
    status = httpx.get(f"{gw.admin_url}/admin/flags/sentiment/status", headers=AUTH)
    assert status.status_code == 200 and status.json()["version"] == 1


def test_a_change_that_cannot_be_applied_keeps_the_previous_snapshot(
    redis_url: str,
    scratch_redis_prefix: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    """A document an older version stored, that this one refuses (an overflowing hold): the
    replica keeps serving what it had, says so once, and applies later changes."""
    v1, v2 = model_server("v1"), model_server("v2")
    flags = flag_doc(v1.url, v2.url, weight=0.5)
    gw = gateway_server(flags, settings=redis_settings(redis_url, scratch_redis_prefix), env=TOKENS)
    assert {r.status_code for r in traffic(gw, 20)} == {200}
    bad = dict(flags["flags"][0], schedule={"steps": [{"weight": 0.5, "hold": "99999999d"}]})
    raw = redis.Redis.from_url(redis_url)
    key = f"{{{scratch_redis_prefix}}}:flag:sentiment"
    raw.hset(key, mapping={"doc": json.dumps(bad), "version": "2"})
    raw.publish(f"{{{scratch_redis_prefix}}}:changes", json.dumps({"kind": "flag", "key": "x"}))

    def problems() -> list[dict[str, str]]:
        return list(httpx.get(f"{gw.admin_url}/readyz").json()["snapshot_problems"])

    listed = wait_for(problems, "/readyz never listed the change it could not apply")
    assert listed[0]["flag"] == "sentiment" and "365d" in listed[0]["reason"]
    assert {r.status_code for r in traffic(gw, 20)} == {200}  # the route is still served
    # several resyncs meet the same document again: logged and counted once
    keeps_for(
        lambda: (
            metric(gw, 'gateway_snapshot_failures_total{flag="sentiment"}') == 1.0
            and gw.server.log().count("change not applied") == 1
        ),
        "one count and one log line for the change not applied",
        seconds=1.5,
    )
    # A later valid change applies (over the version the store holds).
    good = dict(flags["flags"][0], canary=None, rules=[])
    del good["canary"]
    r = httpx.put(
        f"{gw.admin_url}/admin/flags/sentiment", json=good, headers={**AUTH, "If-Match": "2"}
    )
    assert r.status_code == 200, r.text
    wait_for(lambda: not problems(), "the problem stayed listed after a valid change")
    assert {r.headers["x-gateway-variant"] for r in traffic(gw, 20)} == {"v1"}
    raw.close()


def test_memory_store_keeps_applying_changes_after_a_promotion(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    """The memory store's reload used to fail in a task after a `then: canary` promotion,
    and no later change applied; now the promotion applies and so does the next edit."""
    v1, v2, v3 = model_server("v1"), model_server("v2"), model_server("v3")
    gw = gateway_server(flag_doc(v1.url, v2.url, weight=0.5, rules=TO_CANARY), env=TOKENS)
    assert act(gw, "promote", "go").status_code == 200
    wait_for(lambda: document(gw)["version"] == 2, "the promotion never applied")
    doc = document(gw)["document"]
    doc["canary"] = {"name": "v3", "upstream": v3.url}
    r = httpx.put(
        f"{gw.admin_url}/admin/flags/sentiment", json=doc, headers={**AUTH, "If-Match": "2"}
    )
    assert r.status_code == 200 and r.json()["rollout"] == "starts a new rollout", r.text
    # The new canary gets traffic once its rollout starts (the controller's next step).
    status = f"{gw.admin_url}/admin/flags/sentiment/status"
    wait_for(
        lambda: httpx.get(status, headers=AUTH).json()["state"] == "running",
        "the new canary's rollout never started",
    )
    variants = {r.headers["x-gateway-variant"] for r in traffic(gw, 40)}
    assert variants == {"v2", "v3"}  # the rule now sends x-canary to the new stable, v2
    assert "Task exception was never retrieved" not in gw.server.log()
    assert httpx.get(f"{gw.admin_url}/readyz").json()["snapshot_problems"] == []


def test_restart_reason_reaches_the_audit_and_status(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    gw = gateway_server(flag_doc(v1.url, v2.url), env=TOKENS)
    assert act(gw, "rollback", "v2 looks slow").status_code == 200
    assert act(gw, "restart", "v2 fixed in build 42").status_code == 200
    status = httpx.get(f"{gw.admin_url}/admin/flags/sentiment/status", headers=AUTH).json()
    assert status["state"] == "running" and status["reason"] == "v2 fixed in build 42"
    restarts = [e for e in audit(gw) if e["action"] == "restart"]
    assert [e["reason"] for e in restarts] == ["v2 fixed in build 42"]
    assert restarts[0]["details"] == {"from": "rolled_back", "to": "running"}


def test_a_schedule_edit_leaves_a_rolled_back_canary_rolled_back(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    gw = gateway_server(flag_doc(v1.url, v2.url, weight=0.5), env=TOKENS)
    assert act(gw, "rollback", "bad").status_code == 200
    doc = document(gw)["document"]
    doc["schedule"] = {"kind": "step", "steps": [{"weight": 0.9, "hold": "1h"}]}
    r = httpx.put(
        f"{gw.admin_url}/admin/flags/sentiment", json=doc, headers={**AUTH, "If-Match": "1"}
    )
    assert r.status_code == 200 and r.json()["rollout"] == "stays rolled back", r.text
    keeps_for(  # over several controller ticks
        lambda: (
            httpx.get(f"{gw.admin_url}/admin/flags/sentiment/status", headers=AUTH).json()["state"]
            == "rolled_back"
        ),
        "the rolled-back state",
        seconds=0.5,
    )
    assert {r.headers["x-gateway-variant"] for r in traffic(gw, 40)} == {"v1"}
    replace = [e for e in audit(gw) if e["action"] == "replace"]
    assert replace[0]["details"] == {"rollout": "stays rolled back"}
