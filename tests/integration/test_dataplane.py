"""The request path end to end: a real `gateway serve`, real model servers, real sockets.

Tests that exercise the upstream client run for each `upstream.client`: the direct aiohttp
client (the default), the stock aiohttp client on `ClientSession`, and httpx.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import mmh3
import pytest
from conftest import flag_doc, raw_http

CLIENTS = ["aiohttp-direct", "httptools", "aiohttp", "httpx"]


def canary_by_formula(salt: str, unit: str, weight: float) -> bool:
    """DESIGN 3, written out again here so the test does not trust the gateway's own code."""
    return mmh3.hash(f"{salt}:{unit}", seed=0, signed=False) % 10000 < round(weight * 10000)


async def _variants(url: str, units: list[str], *, concurrency: int = 32) -> dict[str, str]:
    limits = httpx.Limits(max_connections=concurrency)
    seen: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        queue = list(units)

        async def worker() -> None:
            while queue:
                unit = queue.pop()
                r = await client.post("/v1/sentiment", content=b"{}", headers={"x-user-id": unit})
                assert r.status_code == 200, r.text
                assert r.json()["model"] == r.headers["x-gateway-variant"]
                seen[unit] = r.headers["x-gateway-variant"]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return seen


def test_sticky_assignment_follows_the_formula_on_every_replica(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    doc = flag_doc(v1.url, v2.url, weight=0.1)
    first, second = gateway_server(doc), gateway_server(doc)
    # Every one of 6,000 units where the formula puts it (the formula itself has its property
    # tests in tests/core); the canary's share of them is 0.0983.
    units = [f"user-{i}" for i in range(6_000)]

    seen = asyncio.run(_variants(first.url, units))
    expected = {u: "v2" if canary_by_formula("sentiment", u, 0.1) else "v1" for u in units}
    wrong = [u for u in units if seen[u] != expected[u]]
    assert wrong == [], f"{len(wrong)} units not where the formula puts them, e.g. {wrong[:5]}"
    share = sum(v == "v2" for v in seen.values()) / len(units)
    assert 0.09 <= share <= 0.11, share

    sample = units[::10]
    again = asyncio.run(_variants(first.url, sample))
    other = asyncio.run(_variants(second.url, sample))
    assert again == {u: seen[u] for u in sample}
    assert other == {u: seen[u] for u in sample}


def test_rules_and_missing_units(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    doc = flag_doc(v1.url, v2.url, weight=0.5)
    doc["flags"][0]["rules"] = [
        {"if": {"header": "x-canary", "equals": "always"}, "then": "canary"},
        {"if": {"unit_in": ["alice", "bob"]}, "then": "stable"},
    ]
    random_doc = flag_doc(v1.url, v2.url, weight=0.5, key="rnd", prefix="/rnd", on_missing="random")
    cookie_doc = flag_doc(v1.url, v2.url, weight=0.5, key="ck", prefix="/ck", on_missing="cookie")
    doc["flags"] += random_doc["flags"] + cookie_doc["flags"]
    gw = gateway_server(doc)
    with httpx.Client(base_url=gw.url) as client:
        # x-canary wins over everything; alice is pinned to stable whatever her bucket says.
        forced = {
            client.get(
                "/v1/sentiment", headers={"x-user-id": f"u{i}", "x-canary": "always"}
            ).headers["x-gateway-variant"]
            for i in range(30)
        }
        assert forced == {"v2"}
        for unit in ("alice", "bob"):
            r = client.get("/v1/sentiment", headers={"x-user-id": unit})
            assert r.headers["x-gateway-variant"] == "v1"
        # on_missing: stable (default) always gives stable to unit-less requests.
        assert {client.get("/v1/sentiment").headers["x-gateway-variant"] for _ in range(30)} == {
            "v1"
        }
        # on_missing: random spreads unit-less requests over both.
        assert {client.get("/rnd").headers["x-gateway-variant"] for _ in range(60)} == {"v1", "v2"}
        # on_missing: cookie issues gw_uid and the client keeps its variant by sending it back.
        client.cookies.clear()
        r = client.get("/ck")
        set_cookie = r.headers["set-cookie"]
        assert set_cookie.startswith("gw_uid=") and "HttpOnly" in set_cookie
        assert "SameSite=Lax" in set_cookie
        unit = set_cookie.split(";")[0].split("=", 1)[1]
        expected = "v2" if canary_by_formula("ck", unit, 0.5) else "v1"
        assert r.headers["x-gateway-variant"] == expected
        for _ in range(10):
            again = client.get("/ck", headers={"cookie": f"gw_uid={unit}"})
            assert again.headers["x-gateway-variant"] == expected
            assert "set-cookie" not in again.headers


@pytest.mark.parametrize("client_kind", CLIENTS)
def test_errors_are_json_with_the_right_status(
    client_kind: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    from conftest import free_port

    v1 = model_server("v1")
    dead = f"http://127.0.0.1:{free_port()}"
    doc = flag_doc(v1.url, None)
    doc["flags"] += flag_doc(dead, None, key="dead", prefix="/dead")["flags"]
    settings = {
        "upstream": {"client": client_kind, "read_timeout_s": 0.5, "max_body_bytes": 1000},
    }
    gw = gateway_server(doc, settings=settings)
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        cases = [
            (client.get("/nowhere"), 404, "no_route"),
            (client.post("/v1/sentiment", content=b"x" * 1001), 413, "too_large"),
            (
                client.post("/v1/sentiment", content=iter([b"x" * 600, b"y" * 600])),
                413,
                "too_large",
            ),
            (client.get("/dead"), 502, "connect_error"),
            (client.get("/v1/sentiment/_stall"), 504, "timeout"),
        ]
    for response, status, error in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["error"] == error and body["message"], body
        assert body["request_id"] == response.headers["x-request-id"]
    # Each answer to a routed request is counted under the variant it was assigned, the 413s
    # (declared length, then streamed) too; an unrouted request has no flag to count under.
    text = httpx.get(f"{gw.admin_url}/metrics").text
    assert 'gateway_requests_total{code="413",flag="sentiment",variant="v1"} 2.0' in text, text
    assert 'gateway_requests_total{code="502",flag="dead",variant="v1"} 1.0' in text, text
    assert 'gateway_requests_total{code="504",flag="sentiment",variant="v1"} 1.0' in text, text
    for path in (b"/v1/sentiment/../admin", b"/v1/sentiment/%2e%2e/admin", b"/v1/sentiment%2fx"):
        request = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        status, body = raw_http(gw.server.port, request)
        assert status == 400, (path, status, body)
        assert json.loads(body)["error"] == "bad_request"


@pytest.mark.parametrize("client_kind", CLIENTS)
def test_hop_by_hop_headers_stay_behind_and_forwarding_headers_are_added(
    client_kind: str, model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1 = model_server("v1")
    gw = gateway_server(flag_doc(v1.url, None), settings={"upstream": {"client": client_kind}})
    sent = {
        "connection": "keep-alive, x-secret-hop",
        "x-secret-hop": "must not pass",
        "keep-alive": "timeout=5",
        "te": "trailers",
        "trailer": "x-foo",
        "proxy-authorization": "Basic Zm9vOmJhcg==",
        "proxy-connection": "keep-alive",
        "x-forwarded-for": "203.0.113.7",
        "x-request-id": "req-123",
        "x-end-to-end": "kept",
    }
    with httpx.Client(base_url=gw.url) as client:
        r = client.get("/v1/sentiment/echo?q=1", headers=sent)
    assert r.status_code == 200
    received = r.json()["headers"]
    for name in (
        "x-secret-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
    ):
        assert name not in received, (name, received)
    assert received.get("connection", "").lower() in ("", "keep-alive", "close")
    assert received["x-end-to-end"] == "kept"
    assert received["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert received["x-forwarded-proto"] == "http"
    assert received["x-forwarded-host"] == f"127.0.0.1:{gw.server.port}"
    assert received["x-request-id"] == "req-123"
    assert r.headers["x-request-id"] == "req-123"
    assert r.headers["x-gateway-variant"] == "v1"
    assert r.json()["path"] == "/v1/sentiment/echo" and r.json()["query"] == "q=1"


def _rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


@pytest.mark.parametrize("client_kind", CLIENTS)
def test_large_response_streams_without_buffering(
    client_kind: str, model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1 = model_server("v1")
    gw = gateway_server(flag_doc(v1.url, None), settings={"upstream": {"client": client_kind}})
    size = 50 * 1024 * 1024
    with httpx.Client(base_url=gw.url, timeout=60) as client:
        client.get("/v1/sentiment/_bytes/1024")  # warm: pools and imports are in the baseline
        before = _rss_peak_kb(gw.server.process.pid)
        received = 0
        with client.stream("GET", f"/v1/sentiment/_bytes/{size}") as r:
            assert r.status_code == 200
            assert int(r.headers["content-length"]) == size
            for chunk in r.iter_raw():
                received += len(chunk)
        growth_mb = (_rss_peak_kb(gw.server.process.pid) - before) / 1024
    assert received == size
    print(f"peak RSS growth while streaming 50 MB ({client_kind}): {growth_mb:.1f} MB")
    assert growth_mb < 30


@pytest.mark.parametrize("client_kind", CLIENTS)
def test_client_disconnect_ends_the_upstream_transfer(
    client_kind: str, tmp_path: Path, spawn: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    from conftest import GATEWAY_BIN

    log = tmp_path / "access.jsonl"
    v1 = spawn(
        lambda p: [
            str(GATEWAY_BIN),
            "model-server",
            "--port",
            str(p),
            "--name",
            "v1",
            "--access-log",
            str(log),
        ]
    )
    gw = gateway_server(flag_doc(v1.url, None), settings={"upstream": {"client": client_kind}})
    chunks = 200  # 10 s of streaming if nobody stops it
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        with client.stream("GET", f"/v1/sentiment/_slow_stream/{chunks}") as r:
            got = 0
            for chunk in r.iter_raw():
                got += len(chunk)
                if got >= 3 * 64 * 1024:
                    break
    deadline = time.monotonic() + 5
    aborted: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not aborted:
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        aborted = [x for x in lines if x.get("event") == "stream_aborted"]
        time.sleep(0.1)
    assert aborted, "the upstream never saw the transfer end"
    assert aborted[0]["sent"] < chunks / 2


@pytest.mark.parametrize("client_kind", CLIENTS)
def test_500_concurrent_requests_all_succeed(
    client_kind: str, model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    gw = gateway_server(
        flag_doc(v1.url, v2.url, weight=0.25),
        settings={"upstream": {"client": client_kind, "connect_timeout_s": 10}},
    )

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
        async with httpx.AsyncClient(base_url=gw.url, limits=limits, timeout=60) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/v1/sentiment",
                        content=f'{{"i": {i}}}'.encode(),
                        headers={"x-user-id": f"u{i}"},
                    )
                    for i in range(500)
                )
            )
        return [r.status_code for r in responses]

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 500, {s: statuses.count(s) for s in set(statuses)}


def test_metrics_count_requests_per_variant(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    v1, v2 = model_server("v1"), model_server("v2")
    gw = gateway_server(flag_doc(v1.url, v2.url, weight=0.5))
    with httpx.Client(base_url=gw.url) as client:
        served = [
            client.get("/v1/sentiment", headers={"x-user-id": f"m{i}"}).headers["x-gateway-variant"]
            for i in range(40)
        ]
        text = httpx.get(f"{gw.admin_url}/metrics").text
    for variant in ("v1", "v2"):
        line = f'gateway_requests_total{{code="200",flag="sentiment",variant="{variant}"}}'
        value = float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])
        assert value == served.count(variant)
    assert 'gateway_canary_weight{flag="sentiment"} 0.5' in text
    assert "gateway_request_duration_seconds_bucket" in text


@pytest.mark.parametrize("client_kind", CLIENTS)
def test_the_upstream_client_and_server_in_use_are_exported(
    client_kind: str,
    server_kind: str,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
) -> None:
    """`gateway_fast_path{part}` names the client and the server that run: the ones configured
    here, as the installed aiohttp and uvicorn are the tested ones (tests/core/test_servers.py
    and test_client_choice.py have the fallbacks)."""
    v1 = model_server("v1")
    gw = gateway_server(flag_doc(v1.url, None), settings={"upstream": {"client": client_kind}})
    assert httpx.get(f"{gw.url}/v1/sentiment/x").status_code == 200
    text = httpx.get(f"{gw.admin_url}/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("gateway_fast_path{")]
    client = [line for line in lines if 'part="client"' in line]
    assert client == [f'gateway_fast_path{{impl="{client_kind}",part="client"}} 1.0'], lines
    server = [line for line in lines if 'part="server"' in line]
    assert server == [f'gateway_fast_path{{impl="{server_kind}",part="server"}} 1.0'], lines
