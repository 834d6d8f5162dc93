"""The real Prometheus scrapes a real gateway under traffic, with deploy/prometheus/rules.yml
loaded: after the guard rolls a bad canary back, every query of the Grafana dashboard returns
data, every rule evaluates without error and the rollback alert is active.

Scrape and evaluation run every second (the rule groups' own `interval:` is dropped for the
test) so the whole story takes seconds. Needs /usr/bin/prometheus (Debian: prometheus); without
it the test fails and says so.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import GATEWAY_BIN, Server, flag_doc


def _deploy_helpers() -> Any:
    """tests/deploy/promql.py: the dashboard's queries and the rules, read as the offline
    tests read them (loaded by path: tests/deploy is not a package)."""
    path = Path(__file__).resolve().parents[1] / "deploy" / "promql.py"
    spec = importlib.util.spec_from_file_location("deploy_promql", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


promql_checks = _deploy_helpers()
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
OPERATOR = "ops-token-123456"
TOKENS = {"GATEWAY_ADMIN_TOKENS": f"ops:operator:{OPERATOR}"}
AUTH = {"authorization": f"Bearer {OPERATOR}"}
ROLLBACK_ALERT = "GatewayCanaryRolledBack"


def start_prometheus(spawn: Callable[..., Server], tmp_path: Path, admin_port: int) -> Server:
    if not Path(PROMETHEUS).exists():
        pytest.fail(
            "prometheus not found: install it (Debian: apt-get install prometheus) to run the "
            "end-to-end test of the alert rules and the dashboard",
            pytrace=False,
        )
    rules = yaml.safe_load(promql_checks.RULES.read_text())
    for group in rules["groups"]:
        group.pop("interval", None)  # every group at the global 1 s
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [
            {
                "job_name": "gateway",
                "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    return spawn(
        lambda port: [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        ready=lambda port: f"http://127.0.0.1:{port}/-/ready",
        timeout_s=30.0,
    )


def query(prometheus: Server, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code in (200, 503), r.text  # 503 until the TSDB is ready
    body = r.json()
    if body.get("status") != "success":
        return []
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def api(prometheus: Server, path: str) -> dict[str, Any]:
    r = httpx.get(f"{prometheus.url}/api/v1/{path}", timeout=10)
    r.raise_for_status()
    data: dict[str, Any] = r.json()["data"]
    return data


def wait_for(check: Callable[[], Any], what: str, *, timeout_s: float, log: Server) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}\nprometheus log:\n{log.log()[-3000:]}")


BUDGET = "error_budget_remaining"  # absent by design until the 30-day window has enough data


def status(gw: Any) -> dict[str, Any]:
    r = httpx.get(f"{gw.admin_url}/admin/flags/sentiment/status", headers=AUTH)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def test_dashboard_queries_and_rollback_alert_on_a_real_prometheus(
    spawn: Callable[..., Server],
    model_server: Callable[..., Server],
    gateway_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    v1 = model_server("v1")
    v2 = model_server("v2", error_rate=0.5, seed=1)
    v3 = model_server("v3", score_offset=0.1, seed=2)
    shadow = {"name": "v3", "upstream": v3.url, "sample": 1.0, "metric": "json:/score"}
    flags = flag_doc(v1.url, v2.url, weight=0.5, shadows=[shadow])
    # A second flag in front of an OpenAI-compatible server, so the dashboard's LLM-stream
    # panels (time to first token, gaps between events, completion tokens) have streams to show.
    llm = spawn(
        lambda port: [
            str(GATEWAY_BIN),
            *("model-server", "--openai", "--port", str(port), "--name", "llm"),
            *("--ttft-ms", "5", "--tokens-per-s", "500", "--completion-tokens", "5"),
        ]
    )
    flags["flags"] += flag_doc(llm.url, None, key="chat", prefix="/v1/chat")["flags"]
    gw = gateway_server(flags, env=TOKENS)
    prometheus = start_prometheus(spawn, tmp_path, gw.admin_port)

    # Scraped while the canary is live, so the rollback is a change Prometheus sees (0 -> 1).
    wait_for(
        lambda: query(prometheus, 'gateway_rollout_state{state="rolled_back"} == 0'),
        "a first scrape of the gateway",
        timeout_s=30,
        log=prometheus,
    )
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        for i in range(300):
            body = f'{{"text": "request {i}"}}'.encode()
            r = client.post("/v1/sentiment", content=body, headers={"x-user-id": f"u{i}"})
            assert r.status_code in (200, 500), r.text
        for i in range(5):
            chat = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            r = client.post("/v1/chat/completions", json=chat, headers={"x-user-id": f"u{i}"})
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
    s = status(gw)
    assert s["state"] == "rolled_back" and s["reason"] == "sprt", s
    # What Prometheus scrapes passes its own linter (names, suffixes, help, types).
    exposition = httpx.get(f"{gw.admin_url}/metrics").text
    lint = subprocess.run(
        [promql_checks.PROMTOOL, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr

    def missing_data() -> list[str]:
        filled = (
            (where, promql_checks.fill_variables(expr, {"$flag": "sentiment|chat"}))
            for where, expr in promql_checks.dashboard_queries()
        )
        return [
            f"{where}: {expr}"
            for where, expr in filled
            if BUDGET not in expr and not query(prometheus, expr)
        ]

    empty: list[str] = []

    def all_answer() -> bool:
        empty[:] = missing_data()
        return not empty

    deadline = time.monotonic() + 30
    while not all_answer() and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    # The 30-day budget waits for 10,000 requests: 300 requests (half of the canary's failing)
    # must not read as a missed SLO on a fresh install.
    wait_for(
        lambda: query(prometheus, 'flag:gateway_requests:increase30d{flag="sentiment"}'),
        "the 30-day request count (its rule group runs once a minute)",
        timeout_s=150,
        log=prometheus,
    )
    assert query(prometheus, f'flag:gateway_slo_availability:{BUDGET}{{flag="sentiment"}}') == []

    def rollback_alert() -> list[dict[str, Any]]:
        return [
            a
            for a in api(prometheus, "alerts")["alerts"]
            if a["labels"]["alertname"] == ROLLBACK_ALERT and a["labels"].get("flag") == "sentiment"
        ]

    (alert,) = wait_for(
        rollback_alert, f"{ROLLBACK_ALERT} to be active", timeout_s=15, log=prometheus
    )
    assert alert["state"] in ("firing", "pending"), alert
    assert alert["labels"]["severity"] == "warning"

    rules = [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in promql_checks.rule_groups())
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
    assert not broken, broken
