"""Shadow traffic end to end: mirrored requests, the pair log, the paired t-test in the status,
and a shadow that is slow, down or saturated never touching the primary response."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import flag_doc, free_port
from scipy import stats

OPERATOR = "ops-token-123456"
TOKENS = {"GATEWAY_ADMIN_TOKENS": f"ops:operator:{OPERATOR}"}
AUTH = {"authorization": f"Bearer {OPERATOR}"}


def shadow_doc(primary: str, shadow: str, **shadow_fields: Any) -> dict[str, Any]:
    doc = flag_doc(primary, None)
    flag = doc["flags"][0]
    flag["shadows"] = [{"name": "v3", "upstream": shadow, "sample": 1.0, **shadow_fields}]
    return doc


def post_bodies(url: str, n: int, *, concurrency: int = 8, method: str = "POST") -> list[Any]:
    async def run() -> list[Any]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one(i: int) -> Any:
                async with sem:
                    body = json.dumps({"text": f"request {i}"}).encode()
                    r = await client.request(
                        method, "/v1/sentiment", content=body, headers={"x-user-id": f"u{i}"}
                    )
                    return r, time.time()

            return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(run())


def shadow_status(gw: Any) -> dict[str, Any]:
    r = httpx.get(f"{gw.admin_url}/admin/flags/sentiment/status", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()["shadows"][0]


def wait_for_pairs(gw: Any, n: int, timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        s = shadow_status(gw)
        if s["n"] >= n or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def with_pair_log(
    gateway_server: Callable[..., Any], primary: Any, shadow: Any, metric: str, tmp_path: Path
) -> tuple[Any, Path]:
    """A gateway mirroring every request from `primary` to `shadow`, its pair log a file."""
    pair_log = tmp_path / "pairs.jsonl"
    gw = gateway_server(
        shadow_doc(primary.url, shadow.url, metric=metric),
        settings={"shadow": {"pair_log": str(pair_log)}},
        env=TOKENS,
    )
    return gw, pair_log


def read_pairs(path: Path, n: int = 0, timeout_s: float = 5) -> list[dict[str, Any]]:
    """The JSON lines of `path`, once there are `n`: the gateway writes its pair log in batches."""
    deadline = time.monotonic() + timeout_s
    while True:
        pairs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if len(pairs) >= n or time.monotonic() > deadline:
            return pairs
        time.sleep(0.05)


@pytest.mark.parametrize(("offset", "significant"), [(0.1, True), (0.0, False)])
def test_paired_ttest_finds_a_score_offset_and_matches_scipy(
    offset: float,
    significant: bool,
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    primary = model_server("v1", seed=11)
    shadow = model_server("v3", seed=29, score_offset=offset)
    gw, pair_log = with_pair_log(gateway_server, primary, shadow, "json:/score", tmp_path)
    answers = post_bodies(gw.url, 600)
    assert all(r.status_code == 200 and r.json()["model"] == "v1" for r, _ in answers)
    s = wait_for_pairs(gw, 600)
    assert s["n"] == 600
    pairs = read_pairs(pair_log, 600)
    assert len(pairs) == 600
    assert {p["shadow"] for p in pairs} == {"v3"} and {p["metric"] for p in pairs} == {
        "json:/score"
    }
    shadow_values = [p["shadow_value"] for p in pairs]
    primary_values = [p["primary_value"] for p in pairs]
    oracle = stats.ttest_rel(shadow_values, primary_values)
    assert s["t"] == pytest.approx(float(oracle.statistic), rel=1e-9, abs=1e-9)
    assert s["p"] == pytest.approx(float(oracle.pvalue), rel=1e-9, abs=1e-300)
    assert s["df"] == 599
    print(f"offset {offset}: mean diff {s['mean_diff']:.4f}, t {s['t']:.2f}, p {s['p']:.3g}")
    if significant:
        assert abs(s["mean_diff"] - 0.1) <= 0.01
        assert s["p"] < 1e-6
        low, high = s["ci95"]
        assert low < 0.1 < high
    else:
        assert s["p"] > 0.01
    wilcoxon = s["wilcoxon_signed_rank_on_reservoir"]
    assert wilcoxon is not None and wilcoxon["n"] > 0
    metrics = httpx.get(f"{gw.admin_url}/metrics").text
    assert (
        'gateway_shadow_requests_total{flag="sentiment",outcome="ok",shadow="v3"} 600.0' in metrics
    )
    assert 'gateway_shadow_ttest{flag="sentiment",shadow="v3",stat="n"} 600.0' in metrics


def test_slow_shadow_never_delays_the_primary(
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    primary = model_server("v1")
    log = tmp_path / "shadow.jsonl"
    shadow = model_server("v3", latency_ms=2000, access_log=log)
    gw = gateway_server(shadow_doc(primary.url, shadow.url, metric="latency_ms"), env=TOKENS)
    answers = post_bodies(gw.url, 40)
    answered_at = max(t for _, t in answers)
    assert all(r.status_code == 200 and r.json()["model"] == "v1" for r, _ in answers)
    s = wait_for_pairs(gw, 40, timeout_s=30)
    assert s["n"] == 40
    # Every primary answer had arrived before the shadow answered anything.
    mirrored = [line for line in read_pairs(log) if line["method"] == "POST"]
    assert len(mirrored) == 40
    assert answered_at < min(line["ts"] for line in mirrored)
    assert s["mean_diff"] > 1500  # shadow_ms - primary_ms: the shadow's 2 s show in the test


def test_a_shadow_that_answers_first_waits_for_the_primary_and_pairs(
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    primary = model_server("v1", latency_ms=300)
    shadow = model_server("v3")
    gw, pair_log = with_pair_log(gateway_server, primary, shadow, "latency_ms", tmp_path)
    answers = post_bodies(gw.url, 16)
    assert all(r.status_code == 200 and r.json()["model"] == "v1" for r, _ in answers)
    s = wait_for_pairs(gw, 16)
    assert s["n"] == 16
    assert s["mean_diff"] < -250  # shadow_ms - primary_ms: the primary's 300 ms show
    pairs = read_pairs(pair_log, 16)
    assert len(pairs) == 16 and all(p["primary_ms"] >= 300 for p in pairs)


def test_shadow_down_leaves_primary_untouched_and_counts_errors(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    primary = model_server("v1")
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway_server(shadow_doc(primary.url, dead, metric="error"), env=TOKENS)
    answers = post_bodies(gw.url, 50)
    assert all(r.status_code == 200 and r.json()["model"] == "v1" for r, _ in answers)
    s = wait_for_pairs(gw, 50)
    assert s["n"] == 50 and s["mean_diff"] == 1.0  # every shadow answer an error, no primary's
    metrics = httpx.get(f"{gw.admin_url}/metrics").text
    assert (
        'gateway_shadow_requests_total{flag="sentiment",outcome="error",shadow="v3"} 50.0'
        in metrics
    )


def test_saturated_shadow_drops_and_counts(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any]
) -> None:
    primary = model_server("v1")
    shadow = model_server("v3", latency_ms=1500)
    gw = gateway_server(
        shadow_doc(primary.url, shadow.url, metric="latency_ms"),
        settings={"shadow": {"max_in_flight": 4}},
        env=TOKENS,
    )
    answers = post_bodies(gw.url, 100, concurrency=16)
    assert all(r.status_code == 200 for r, _ in answers)
    metrics = httpx.get(f"{gw.admin_url}/metrics").text
    counts = {}
    for outcome in ("ok", "error", "dropped"):
        prefix = (
            f'gateway_shadow_requests_total{{flag="sentiment",outcome="{outcome}",shadow="v3"}}'
        )
        line = next((x for x in metrics.splitlines() if x.startswith(prefix)), None)
        counts[outcome] = float(line.split()[-1]) if line else 0.0
    print(f"saturated shadow: {counts}")
    assert counts["dropped"] >= 80  # at most 4 in flight while each takes 1.5 s
    wait_for_pairs(gw, 100 - int(counts["dropped"]), timeout_s=10)
    metrics = httpx.get(f"{gw.admin_url}/metrics").text
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith('gateway_shadow_requests_total{flag="sentiment",outcome="ok",shadow="v3"}')
    )
    assert float(line.split()[-1]) + counts["dropped"] == 100


def test_methods_outside_mirror_methods_are_never_mirrored(
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    primary = model_server("v1")
    log = tmp_path / "shadow.jsonl"
    shadow = model_server("v3", access_log=log)
    gw = gateway_server(shadow_doc(primary.url, shadow.url), env=TOKENS)
    for method in ("PUT", "DELETE", "PATCH"):
        answers = post_bodies(gw.url, 10, method=method)
        assert all(r.status_code == 200 for r, _ in answers)
    post_bodies(gw.url, 5)  # POST is mirrored: proves the shadow is reachable and logging
    wait_for_pairs(gw, 5)
    # (the readiness probe's GET of a test hook is in the log too; it did not come mirrored)
    methods = [line["method"] for line in read_pairs(log) if "_bytes" not in line["path"]]
    assert methods == ["POST"] * 5
