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
    # The Wilcoxon test ran on this replica's own 600 pairs (the memory store's fleet).
    wilcoxon = s["wilcoxon"]
    assert (wilcoxon["pairs"], wilcoxon["pairs_from"]) == (600, "replica")
    oracle_w = stats.wilcoxon([p["d"] for p in pairs])
    assert wilcoxon["p"] == pytest.approx(float(oracle_w.pvalue), rel=1e-9, abs=1e-300)
    metrics = httpx.get(f"{gw.admin_url}/metrics").text
    assert (
        'gateway_shadow_requests_total{flag="sentiment",outcome="ok",shadow="v3"} 600.0' in metrics
    )
    n_gauge = 'gateway_shadow_ttest{flag="sentiment",metric="json:/score",shadow="v3",stat="n"}'
    assert f"{n_gauge} 600.0" in metrics


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


def metric_value(metrics: str, name: str, **labels: str) -> float | None:
    """The value of the series `name{labels}` in a /metrics text (labels in any order)."""
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for line in metrics.splitlines():
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            if set(series[len(name) + 1 : -1].split(",")) == wanted:
                return float(value)
    return None


def test_unmeasured_pairs_are_logged_counted_and_left_out(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any], tmp_path: Path
) -> None:
    primary = model_server("v1", seed=3)
    nan = model_server("v3", seed=4, score_fault="nan", score_fault_rate=0.4)
    missing = model_server("v4", seed=5, score_fault="missing", score_fault_rate=0.25)
    doc = flag_doc(primary.url, None)
    metric = ["json:/score", "latency_ms"]
    doc["flags"][0]["shadows"] = [
        {"name": "v3", "upstream": nan.url, "metric": metric},
        {"name": "v4", "upstream": missing.url, "metric": metric},
    ]
    pair_log = tmp_path / "pairs.jsonl"
    gw = gateway_server(doc, settings={"shadow": {"pair_log": str(pair_log)}}, env=TOKENS)
    answers = post_bodies(gw.url, 200)
    # The primary is unaffected: every answer is v1's, with its number.
    assert all(r.status_code == 200 and r.json()["model"] == "v1" for r, _ in answers)
    assert all(isinstance(r.json()["score"], float) for r, _ in answers)
    pairs = read_pairs(pair_log, 800, timeout_s=20)
    assert len(pairs) == 800  # 200 requests x 2 shadows x 2 metrics, none lost
    deadline = time.monotonic() + 20
    while True:
        doc_now = httpx.get(f"{gw.admin_url}/admin/flags/sentiment/status", headers=AUTH).json()
        entries = {(e["shadow"], e["metric"]): e for e in doc_now["shadows"]}
        if all(e["n"] + e["unmeasured"] == 200 for e in entries.values()):
            break
        assert time.monotonic() < deadline, entries
        time.sleep(0.1)
    assert set(entries) == {(s, m) for s in ("v3", "v4") for m in metric}
    metrics = httpx.get(f"{gw.admin_url}/metrics").text
    reasons = {"v3": "shadow: /score is not a number (str)", "v4": "shadow: no /score in the body"}
    for shadow, why in reasons.items():
        scored = [p for p in pairs if p["shadow"] == shadow and p["metric"] == "json:/score"]
        lost = [p for p in scored if p["d"] is None]
        kept = [p for p in scored if p["d"] is not None]
        assert lost and kept and {p["reason"] for p in lost} == {why}
        assert all(p["shadow_value"] is None and p["primary_value"] is not None for p in lost)
        entry = entries[(shadow, "json:/score")]
        assert (entry["n"], entry["unmeasured"]) == (len(kept), len(lost))
        counted = metric_value(
            metrics,
            "gateway_shadow_requests_total",
            flag="sentiment",
            shadow=shadow,
            outcome="unmeasured",
        )
        assert counted == len(lost)
        # The statistics are those of the measured pairs alone, and finite.
        oracle = stats.ttest_rel(
            [p["shadow_value"] for p in kept], [p["primary_value"] for p in kept]
        )
        assert entry["t"] == pytest.approx(float(oracle.statistic), rel=1e-9)
        assert entry["p"] == pytest.approx(float(oracle.pvalue), rel=1e-9)
        assert all(isinstance(x, float) for x in (*entry["ci95"], entry["mean_diff"]))
        latency = entries[(shadow, "latency_ms")]
        assert (latency["n"], latency["unmeasured"]) == (200, 0)
    # Holm runs over all four comparisons.
    assert all(
        "Holm over" in e["verdict"] or "not enough" in e["verdict"] for e in entries.values()
    )


def test_status_document_carries_every_comparison_field(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any], tmp_path: Path
) -> None:
    primary = model_server("v1", seed=11, error_rate=0.05)
    shadow = model_server("v3", seed=12, score_offset=0.1, error_rate=0.15)
    metric = ["json:/score", "latency_ms", "error", "agreement"]
    pair_log = tmp_path / "pairs.jsonl"
    gw = gateway_server(
        shadow_doc(primary.url, shadow.url, metric=metric, mde={"json:/score": 0.05}),
        settings={"shadow": {"pair_log": str(pair_log)}},
        env=TOKENS,
    )
    post_bodies(gw.url, 400)
    pairs = read_pairs(pair_log, 1600, timeout_s=20)
    assert len(pairs) == 1600
    deadline = time.monotonic() + 20
    while True:
        r = httpx.get(f"{gw.admin_url}/admin/flags/sentiment/status", headers=AUTH)
        entries = {e["metric"]: e for e in r.json()["shadows"]}
        if all(e["n"] + e["unmeasured"] == 400 for e in entries.values()):
            break
        assert time.monotonic() < deadline, entries
        time.sleep(0.1)
    print(json.dumps(r.json(), indent=1))
    by_metric = {m: [p for p in pairs if p["metric"] == m] for m in metric}
    # json:/score: the 0.1 offset is found by the always-valid test, inside its CS.
    score = entries["json:/score"]
    assert score["tau"] == 0.05 and score["p_always_valid"] < 1e-6
    assert score["cs95"][0] < 0.1 < score["cs95"][1]
    assert score["ci95"][0] > score["cs95"][0] and score["ci95"][1] < score["cs95"][1]
    assert score["verdict"] == "shadow higher (always-valid p < 0.01, Holm over 3)"
    measured = [p["d"] for p in by_metric["json:/score"] if p["d"] is not None]
    assert score["wilcoxon"]["pairs"] == len(measured) == score["n"]
    assert score["wilcoxon"]["p"] == pytest.approx(stats.wilcoxon(measured).pvalue, rel=1e-9)
    # error: McNemar on the discordant pairs of the log, and the t-test on d alongside.
    errors = by_metric["error"]
    b = sum(1 for p in errors if p["shadow_value"] == 1 and p["primary_value"] == 0)
    c = sum(1 for p in errors if p["shadow_value"] == 0 and p["primary_value"] == 1)
    mcnemar = entries["error"]["mcnemar"]
    assert (mcnemar["shadow_only"], mcnemar["primary_only"]) == (b, c)
    assert mcnemar["p"] == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    assert entries["error"]["t"] is not None
    # agreement: a rate with Wilson's interval, no t-test.
    agreement = entries["agreement"]
    agreed = sum(1 for p in by_metric["agreement"] if p["d"] == 0)
    assert agreement["agreement"]["k"] == agreed and agreement["agreement"]["n"] == 400
    low, high = agreement["agreement"]["wilson95"]
    assert 0.0 <= low <= agreed / 400 <= high <= 1.0
    assert agreement["t"] is None and agreement["p_always_valid"] is None
    assert agreement["verdict"].startswith("agrees on ")
    metrics = httpx.get(f"{gw.admin_url}/metrics").text
    verdict = metric_value(
        metrics, "gateway_shadow_verdict", flag="sentiment", shadow="v3", metric="json:/score"
    )
    assert verdict == 1.0
    for stat in ("p_always_valid", "cs95_low", "cs95_high", "ci95_low", "ci95_high", "p", "t"):
        labels = {"flag": "sentiment", "shadow": "v3", "metric": "json:/score", "stat": stat}
        assert metric_value(metrics, "gateway_shadow_ttest", **labels) is not None, stat
