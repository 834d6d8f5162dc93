"""Rollouts end to end: the guard rolls back a bad canary, schedules ramp and promote, operators
pause and resume; real `gateway serve` processes, real model servers, the real admin API."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from conftest import GATEWAY_BIN, flag_doc
from waiting import keeps_for, wait_until

from gateway.app import create_app
from gateway.core.schedule import Phase
from gateway.errors import IllegalTransition, NotFoundError
from gateway.settings import load_settings

OPERATOR = "ops-token-123456"
TOKENS = {"GATEWAY_ADMIN_TOKENS": f"ops:operator:{OPERATOR},eye:viewer:viewer-token-1234"}
AUTH = {"authorization": f"Bearer {OPERATOR}"}


def status(gw: Any, key: str = "sentiment") -> dict[str, Any]:
    r = httpx.get(f"{gw.admin_url}/admin/flags/{key}/status", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def act(gw: Any, action: str, reason: str = "test", key: str = "sentiment") -> httpx.Response:
    return httpx.post(
        f"{gw.admin_url}/admin/flags/{key}/{action}", headers=AUTH, json={"reason": reason}
    )


def access_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def logged_model(spawn: Callable[..., Any], tmp_path: Path, name: str, *extra: str) -> Any:
    log = tmp_path / f"{name}.jsonl"
    server = spawn(
        lambda p: [
            str(GATEWAY_BIN),
            "model-server",
            "--port",
            str(p),
            "--name",
            name,
            "--access-log",
            str(log),
            *extra,
        ]
    )
    return server, log


def test_bad_canary_is_rolled_back_within_a_few_requests(
    spawn: Callable[..., Any], tmp_path: Path, gateway_server: Callable[..., Any]
) -> None:
    v1, _ = logged_model(spawn, tmp_path, "v1")
    v2, v2_log = logged_model(spawn, tmp_path, "v2", "--error-rate", "0.5", "--seed", "1")
    gw = gateway_server(flag_doc(v1.url, v2.url, weight=0.5), env=TOKENS)
    canary_answers = 0
    with httpx.Client(base_url=gw.url) as client:
        for i in range(400):
            r = client.post("/v1/sentiment", content=b"{}", headers={"x-user-id": f"u{i}"})
            if r.headers["x-gateway-variant"] == "v2":
                canary_answers += 1
            if status(gw)["state"] == "rolled_back":
                break
        s = status(gw)
        assert s["state"] == "rolled_back", s
        print(f"canary requests answered before the rollback: {canary_answers}")
        assert canary_answers <= 15
        guard = s["guard"]
        assert s["reason"] == "sprt"
        assert guard["llr"] >= guard["A"] > 4.49
        assert guard["n"] >= 3 and guard["k"] >= 3
        assert math.isclose(
            guard["llr"],
            guard["k"] * math.log(5) + (guard["n"] - guard["k"]) * math.log(0.95 / 0.99),
            rel_tol=1e-6,
        )
        logged = len(access_log(v2_log))
        after = [
            client.post("/v1/sentiment", content=b"{}", headers={"x-user-id": f"w{i}"})
            for i in range(200)
        ]
    assert {r.headers["x-gateway-variant"] for r in after} == {"v1"}
    assert all(r.status_code == 200 for r in after)
    assert len(access_log(v2_log)) == logged
    audit = httpx.get(f"{gw.admin_url}/admin/audit", params={"flag": "sentiment"}, headers=AUTH)
    rollbacks = [e for e in audit.json()["events"] if e["action"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["reason"] == "sprt"
    assert rollbacks[0]["details"]["llr"] >= rollbacks[0]["details"]["A"]
    metrics = httpx.get(f"{gw.admin_url}/metrics").text
    assert 'gateway_rollbacks_total{flag="sentiment",reason="sprt"} 1.0' in metrics
    assert 'gateway_rollout_state{flag="sentiment",state="rolled_back"} 1.0' in metrics


def _drive(url: str, stop: Callable[[], bool], *, concurrency: int = 8, limit_s: float = 90) -> int:
    """Steady traffic from many users until `stop()`; returns the number of failed requests."""

    async def run() -> int:
        failures = 0
        deadline = time.monotonic() + limit_s
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:

            async def worker(w: int) -> None:
                nonlocal failures
                i = 0
                while not stop() and time.monotonic() < deadline:
                    i += 1
                    r = await client.post(
                        "/v1/sentiment", content=b"{}", headers={"x-user-id": f"w{w}-{i}"}
                    )
                    failures += r.status_code != 200

            await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return failures

    return asyncio.run(run())


def test_healthy_canary_ramps_with_evidence_and_is_promoted(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    steps = [
        {"weight": 0.1, "hold": "1s"},
        {"weight": 0.5, "hold": "1s"},
        {"weight": 1.0, "hold": "1s"},
    ]
    doc = flag_doc(v1.url, v2.url, schedule={"kind": "step", "steps": steps})
    gw = gateway_server(doc, env=TOKENS)
    seen: list[dict[str, Any]] = []

    def promoted() -> bool:
        s = status(gw)
        seen.append(s)
        return s["state"] == "promoted"

    failures = _drive(gw.url, promoted)
    assert failures == 0
    assert seen[-1]["state"] == "promoted", seen[-1]
    by_step: dict[int, list[dict[str, Any]]] = {}
    for s in seen:
        if s["step"] is not None and s["state"] == "running":
            by_step.setdefault(s["step"], []).append(s)
    assert set(by_step) >= {0, 1, 2}
    for i, observed in by_step.items():
        assert {s["weight"] for s in observed} == {steps[i]["weight"]}
    for i in (1, 2):
        # Evidence gating: step i began only after the guard had accepted H0 in each earlier
        # step (one acceptance per step: 56 clean canary answers with the default bounds).
        assert min(s["guard"]["accepts"] for s in by_step[i]) >= i, by_step[i][0]
    document = httpx.get(f"{gw.admin_url}/admin/flags/sentiment", headers=AUTH).json()["document"]
    assert document["stable"]["name"] == "v2" and "canary" not in document
    with httpx.Client(base_url=gw.url) as client:
        variants = {
            client.get("/v1/sentiment", headers={"x-user-id": f"z{i}"}).headers["x-gateway-variant"]
            for i in range(50)
        }
    assert variants == {"v2"}
    events = httpx.get(f"{gw.admin_url}/admin/audit", headers=AUTH).json()["events"]
    assert [e["actor"] for e in events if e["action"] == "promote"] == ["controller"]


def test_exponential_weight_follows_the_formula(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    p0, rate = 0.05, 0.5
    schedule = {"kind": "exponential", "p0": p0, "rate": f"{rate}/s", "hold_at_full": "1h"}
    gw = gateway_server(flag_doc(v1.url, v2.url, schedule=schedule), env=TOKENS)
    seen: list[tuple[float, float]] = []

    def follows_the_formula() -> bool:
        s = status(gw)
        t, weight = s["running_s"], s["weight"]
        # The weight is the controller's last tick (every 0.1 s): never ahead of the formula
        # now (running_s is rounded to the millisecond), and never going back; how far behind
        # depends on how busy the machine is.
        ahead = min(1.0, p0 * math.exp(rate * max(0.0, t + 0.001)))
        assert p0 - 1e-9 <= weight <= ahead + 1e-9, (t, weight, ahead, seen[-3:])
        assert not seen or weight >= seen[-1][1], (seen[-1], (t, weight))
        seen.append((t, weight))
        return weight == 1.0

    # T* = ln(20) / 0.5 = 6 s of rollout clock; the deadline is for a busy machine
    wait_until(follows_the_formula, "the weight to reach 1.0", within_s=60)
    assert len({w for _, w in seen}) >= 5, seen  # it ramps, not jumps


def test_fallback_hides_canary_errors_and_still_rolls_back(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2", error_rate=1.0)
    gw = gateway_server(
        flag_doc(v1.url, v2.url, weight=0.5, on_canary_error="fallback"), env=TOKENS
    )
    with httpx.Client(base_url=gw.url) as client:
        answers = [
            client.post("/v1/sentiment", content=b"{}", headers={"x-user-id": f"u{i}"})
            for i in range(100)
        ]
    assert [r.status_code for r in answers] == [200] * 100
    assert {r.json()["model"] for r in answers} == {"v1"}
    s = status(gw)
    assert s["state"] == "rolled_back" and s["reason"] == "sprt"
    assert s["guard"]["k"] >= 3


def test_pause_freezes_weight_and_clock_and_resume_continues(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    schedule = {"kind": "exponential", "p0": 0.01, "rate": "0.2/s", "hold_at_full": "1h"}
    gw = gateway_server(flag_doc(v1.url, v2.url, schedule=schedule), env=TOKENS)
    wait_until(lambda: status(gw)["weight"] > 0.01, "the weight to leave p0")
    r = act(gw, "pause", "looking at a dashboard")
    assert r.status_code == 200, r.text
    frozen = status(gw)
    assert frozen["state"] == "paused"

    def still_frozen() -> bool:
        now = status(gw)
        return (now["weight"], now["running_s"]) == (frozen["weight"], frozen["running_s"])

    keeps_for(still_frozen, "the paused weight and clock", seconds=1.5)
    refused = act(gw, "pause")
    assert refused.status_code == 409, refused.text  # already paused: an illegal transition
    assert refused.json()["error"] == "illegal_transition"
    before_resume = time.monotonic()
    assert act(gw, "resume", "done").status_code == 200
    resumed = wait_until(
        lambda: (s := status(gw))["running_s"] > frozen["running_s"] + 0.5 and s,
        "the rollout clock to run again",
    )
    since_resume = time.monotonic() - before_resume
    assert resumed["state"] == "running"
    # The clock counts from the resume on, never the 1.5 s and more spent paused.
    assert resumed["running_s"] - frozen["running_s"] <= since_resume + 0.05
    wait_until(lambda: status(gw)["weight"] > frozen["weight"], "the weight to grow again")
    actions = [
        e["action"] for e in httpx.get(f"{gw.admin_url}/admin/audit", headers=AUTH).json()["events"]
    ]
    assert actions[:2] == ["resume", "pause"]


def test_operator_rollback_and_restart(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    gw = gateway_server(flag_doc(v1.url, v2.url, weight=0.5), env=TOKENS)
    assert act(gw, "rollback", "bad dashboard").status_code == 200
    s = status(gw)
    assert s["state"] == "rolled_back" and s["weight"] == 0.0
    with httpx.Client(base_url=gw.url) as client:
        seen = {
            client.get("/v1/sentiment", headers={"x-user-id": f"u{i}"}).headers["x-gateway-variant"]
            for i in range(60)
        }
        assert seen == {"v1"}
        viewer = {"authorization": "Bearer viewer-token-1234"}
        denied = httpx.post(
            f"{gw.admin_url}/admin/flags/sentiment/restart", headers=viewer, json={"reason": "x"}
        )
        assert denied.status_code == 403
        assert act(gw, "restart", "fixed").status_code == 200
        assert status(gw)["state"] == "running" and status(gw)["weight"] == 0.5
        seen = {
            client.get("/v1/sentiment", headers={"x-user-id": f"u{i}"}).headers["x-gateway-variant"]
            for i in range(60)
        }
        assert seen == {"v1", "v2"}


def test_cli_rollout_verbs_drive_the_admin_api(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    gw = gateway_server(flag_doc(v1.url, v2.url, weight=0.5), env=TOKENS)
    env = {**os.environ, "GATEWAY_ADMIN_URL": gw.admin_url, "GATEWAY_TOKEN": OPERATOR}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(GATEWAY_BIN), *args], env=env, capture_output=True, text=True, timeout=60
        )

    shown = cli("flags", "status", "sentiment")
    assert shown.returncode == 0, shown.stderr
    assert "sentiment: running, canary weight 50.00%" in shown.stdout
    assert "guard: n=" in shown.stdout
    assert cli("pause", "sentiment", "--reason", "dashboards").returncode == 0
    assert json.loads(cli("flags", "status", "sentiment", "--json").stdout)["state"] == "paused"
    again = cli("pause", "sentiment", "--reason", "twice")
    assert again.returncode == 1 and "cannot pause" in again.stderr + again.stdout
    assert cli("resume", "sentiment", "--reason", "ok").returncode == 0
    rolled = cli("rollback", "sentiment", "--reason", "latency regression")
    assert rolled.returncode == 0 and "rolled_back" in rolled.stdout
    assert status(gw)["state"] == "rolled_back"
    events = httpx.get(f"{gw.admin_url}/admin/audit", headers=AUTH).json()["events"]
    assert (events[0]["action"], events[0]["actor"], events[0]["reason"]) == (
        "rollback",
        "ops",
        "latency regression",
    )
    assert cli("restart", "sentiment").returncode == 0
    assert cli("promote", "sentiment", "--reason", "looks good").returncode == 0
    deadline = time.monotonic() + 10
    while get_document(gw)["stable"]["name"] != "v2":
        assert time.monotonic() < deadline, "promotion never rewrote the flag"
        time.sleep(0.1)


def get_document(gw: Any) -> dict[str, Any]:
    return httpx.get(f"{gw.admin_url}/admin/flags/sentiment", headers=AUTH).json()["document"]


def test_act_raises_the_gateways_own_errors(
    tmp_path: Path, model_server: Callable[..., Any]
) -> None:
    """The controller's action entry point refuses with NotFoundError (404) and
    IllegalTransition (409), which the admin API answers, never a bare ValueError."""
    v1, v2 = model_server("v1"), model_server("v2")
    flags = flag_doc(v1.url, v2.url)
    flags["flags"].append(flag_doc(v1.url, None, key="plain", prefix="/v1/plain")["flags"][0])
    path = tmp_path / "flags.yaml"
    path.write_text(json.dumps(flags))
    gateway = create_app(load_settings(None, env={}, overrides={"store.flags_file": str(path)}))

    async def refusals() -> list[BaseException]:
        async with gateway.running():
            act = gateway.controller.act
            tries = [
                act("nope", "pause", actor="t", reason=""),
                act("sentiment", "jump", actor="t", reason=""),
                act("plain", "pause", actor="t", reason=""),
                act("sentiment", "resume", actor="t", reason=""),  # it is running, not paused
            ]
            found = await asyncio.gather(*tries, return_exceptions=True)
            rollout = gateway.controller.rollout("sentiment")
            assert rollout is not None and rollout.phase is Phase.RUNNING  # nothing was written
            return [e for e in found if isinstance(e, BaseException)]

    errors = asyncio.run(refusals())
    assert [type(e) for e in errors] == [
        NotFoundError,
        IllegalTransition,
        IllegalTransition,
        IllegalTransition,
    ]
    assert "unknown action 'jump'" in str(errors[1])
    assert "no canary" in str(errors[2])
    assert "cannot resume a rollout that is running" in str(errors[3])
