"""LLM serving end to end: the official `openai` SDK as the client, real `gateway serve`, real
`gateway model-server --openai` upstreams. Routing and assignment from the JSON body, the per-arm
model rewrite, unbuffered streams, the stream guard kinds and a shadow compared on TTFT."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import GATEWAY_BIN
from scipy import stats
from scrape import metric
from waiting import wait_until

from gateway.core.assignment import bucket, canary_threshold

OPERATOR = "ops-token-123456"
TOKENS = {"GATEWAY_ADMIN_TOKENS": f"ops:operator:{OPERATOR}"}
AUTH = {"authorization": f"Bearer {OPERATOR}"}
MESSAGES = [{"role": "user", "content": "Say something."}]


def llm(spawn: Callable[..., Any], tmp_path: Path, name: str, **options: Any) -> tuple[Any, Path]:
    """A `gateway model-server --openai` with an access log."""
    log = tmp_path / f"{name}.jsonl"
    extra = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        extra += [flag] if value is True else [flag, str(value)]
    server = spawn(
        lambda p: [
            str(GATEWAY_BIN),
            "model-server",
            "--openai",
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


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def llm_flag(
    stable: str, canary: str | None, *, weight: float = 0.5, **fields: Any
) -> dict[str, Any]:
    """One flag on /v1 routing model "llama" by the body, the unit from the body's "user"."""
    flag: dict[str, Any] = {
        "key": "chat",
        "route": {"path_prefix": "/v1", "model": "llama"},
        "unit": {"from": "body", "name": "/user"},
        "stable": {"name": "v1", "upstream": stable, "model": "llama-v1"},
        **fields,
    }
    if canary is not None:
        flag["canary"] = {"name": "v2", "upstream": canary, "model": "llama-v2"}
        flag["schedule"] = {"kind": "step", "steps": [{"weight": weight, "hold": "1h"}]}
    return {"flags": [flag]}


def status(gw: Any) -> dict[str, Any]:
    r = httpx.get(f"{gw.admin_url}/admin/flags/chat/status", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def sdk(url: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **options)


def stream_chat(client: openai.OpenAI, user: str, **extra: Any) -> dict[str, Any]:
    """One streamed chat completion: variant, text, TTFT (to the first content), clean end."""
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model="llama", messages=MESSAGES, stream=True, user=user, **extra
    )
    out: dict[str, Any] = {"variant": raw.headers.get("x-gateway-variant"), "text": ""}
    out["request_id"] = raw.headers.get("x-request-id")
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            out.setdefault("ttft_s", time.perf_counter() - started)
            out["text"] += chunk.choices[0].delta.content
        if chunk.choices and chunk.choices[0].finish_reason:
            out["finish"] = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            out["tokens"] = chunk.usage.completion_tokens
    return out


def expected_variant(user: str, weight: float) -> str:
    return "v2" if bucket("chat", user) < canary_threshold(weight) else "v1"


def test_sdk_streams_through_the_gateway_sticky_by_body_user_with_the_model_rewritten(
    spawn: Callable[..., Any], tmp_path: Path, gateway_server: Callable[..., Any]
) -> None:
    v1, v1_log = llm(spawn, tmp_path, "vllm-a", tokens_per_s=200, ttft_ms=20)
    v2, v2_log = llm(spawn, tmp_path, "vllm-b", tokens_per_s=200, ttft_ms=20)
    gw = gateway_server(llm_flag(v1.url, v2.url), env=TOKENS)
    client = sdk(gw.url)
    users = [f"user-{i}" for i in range(30)]
    first = {u: stream_chat(client, u) for u in users}
    again = {u: stream_chat(client, u) for u in users}
    for u in users:
        assert first[u]["variant"] == again[u]["variant"] == expected_variant(u, 0.5), u
        assert first[u]["finish"] == "stop" and first[u]["tokens"] == 16
        assert first[u]["text"] == again[u]["text"] and len(first[u]["text"].split()) == 16
    canary_users = {u for u in users if first[u]["variant"] == "v2"}
    assert 0 < len(canary_users) < len(users)  # both arms served: the test can tell them apart
    started = [r for r in records(v1_log) + records(v2_log) if "status" in r]
    assert len(started) == 2 * len(users)
    for r in started:
        # Each upstream received its own model name, and only the users assigned to it.
        assert r["model"] == ("llama-v2" if r["server"] == "vllm-b" else "llama-v1"), r
        assert (r["user"] in canary_users) == (r["server"] == "vllm-b"), r
    metrics = httpx.get(f"{gw.admin_url}/metrics").text
    streams_v2 = 2 * len(canary_users)
    assert f'gateway_ttft_seconds_count{{flag="chat",variant="v2"}} {float(streams_v2)}' in metrics
    tokens = f'gateway_completion_tokens_total{{flag="chat",variant="v2"}} {16.0 * streams_v2}'
    assert tokens in metrics
    assert 'gateway_stream_gap_seconds_count{flag="chat",variant="v1"}' in metrics


def test_each_streamed_token_reaches_the_sdk_before_the_upstream_sends_the_next(
    spawn: Callable[..., Any], tmp_path: Path, gateway_server: Callable[..., Any]
) -> None:
    # 2 tokens a second, each logged by the upstream before it is sent
    v1, v1_log = llm(spawn, tmp_path, "vllm-a", tokens_per_s=2, ttft_ms=10, log_tokens=True)
    gw = gateway_server(llm_flag(v1.url, None), env=TOKENS)
    stream = sdk(gw.url).chat.completions.create(
        model="llama",
        messages=MESSAGES,
        stream=True,
        user="u1",
        max_tokens=5,
        extra_headers={"x-request-id": "incremental-1"},
    )

    def logged() -> list[dict[str, Any]]:
        return [r for r in records(v1_log) if r.get("request_id") == "incremental-1"]

    sent_when_received: list[list[int]] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            sent_when_received.append([r["i"] for r in logged() if r.get("event") == "token"])
    # Ordering, not timing: token k was in the SDK's hands while the upstream had not yet sent
    # token k + 1 (nor ended the stream). A relay that held a chunk back until the next one
    # arrived would show k + 1 here.
    assert sent_when_received == [list(range(k + 1)) for k in range(5)]
    ends = [(r["event"], r["tokens"]) for r in logged() if r.get("event") == "stream_end"]
    assert ends == [("stream_end", 5)]


def test_ttft_figures_through_the_gateway_and_direct(
    spawn: Callable[..., Any], tmp_path: Path, gateway_server: Callable[..., Any]
) -> None:
    """Report figures (printed), with a loose sanity bound: the gateway adds no token delay."""
    v1, _ = llm(spawn, tmp_path, "vllm-a", tokens_per_s=100, ttft_ms=100)
    gw = gateway_server(llm_flag(v1.url, None), env=TOKENS)
    direct, through = openai.OpenAI(base_url=f"{v1.url}/v1", api_key="x"), sdk(gw.url)
    for client in (direct, through):
        stream_chat(client, "warm-up")
    pairs = [(stream_chat(direct, f"u{i}"), stream_chat(through, f"u{i}")) for i in range(30)]
    d = [p[0]["ttft_s"] * 1000 for p in pairs]
    g = [p[1]["ttft_s"] * 1000 for p in pairs]
    added = sorted(b - a for a, b in zip(d, g, strict=True))
    print(
        f"TTFT ms direct p50 {statistics.median(d):.1f}, via gateway p50 {statistics.median(g):.1f}"
        f"; added p50 {statistics.median(added):.2f}, max {added[-1]:.2f}"
    )
    assert all(len(p[0]["text"].split()) == len(p[1]["text"].split()) == 16 for p in pairs)
    assert statistics.median(g) >= 100  # the upstream's TTFT is there: first event measured


def drive(
    url: str,
    done: Callable[[], bool],
    *,
    threads: int = 6,
    limit_s: float = 120,
    timeout_s: float = 30,
) -> list:
    """Streams from several threads until `done()`; every outcome, in completion order."""
    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + limit_s
    counter = iter(range(10**6))

    def work() -> None:
        client = sdk(url, timeout=timeout_s)
        while not done() and time.monotonic() < deadline:
            with lock:
                user = f"user-{next(counter)}"
            try:
                out = stream_chat(client, user, extra_headers={"x-request-id": f"r-{user}"})
            except (openai.APIError, httpx.HTTPError) as exc:
                out = {"user": user, "error": type(exc).__name__, "request_id": f"r-{user}"}
            out["user"] = user
            with lock:
                outcomes.append(out)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return outcomes


def rolled_back(gw: Any) -> Callable[[], bool]:
    return lambda: status(gw)["state"] == "rolled_back"


def test_a_canary_whose_ttft_regresses_is_rolled_back_by_ttft_over(
    spawn: Callable[..., Any], tmp_path: Path, gateway_server: Callable[..., Any]
) -> None:
    v1, _ = llm(spawn, tmp_path, "vllm-a", ttft_ms=100, tokens_per_s=100)
    v2, _ = llm(spawn, tmp_path, "vllm-b", ttft_ms=800, tokens_per_s=100)
    doc = llm_flag(v1.url, v2.url, guard={"errors": ["status_5xx", "ttft_over:500"]})
    gw = gateway_server(doc, env=TOKENS)
    outcomes = drive(gw.url, rolled_back(gw))
    s = status(gw)
    assert s["state"] == "rolled_back" and s["reason"] == "sprt", s
    assert set(s["guard"]["error_kinds"]) == {"ttft_over:500"}, s["guard"]
    assert s["guard"]["k"] >= 4
    audit = httpx.get(f"{gw.admin_url}/admin/audit", params={"flag": "chat"}, headers=AUTH)
    rollback = next(e for e in audit.json()["events"] if e["action"] == "rollback")
    assert set(rollback["details"]["error_kinds"]) == {"ttft_over:500"}, rollback
    canary = [o for o in outcomes if o.get("variant") == "v2"]
    print(f"canary streams before the rollback: {len(canary)} of {len(outcomes)}")
    assert all("error" not in o for o in outcomes)  # slow, not broken: every stream completed
    after = [stream_chat(sdk(gw.url), f"late-{i}") for i in range(20)]
    assert {o["variant"] for o in after} == {"v1"}


@pytest.mark.parametrize(
    ("option", "kind"), [("abort_rate", "stream_aborted"), ("error_event_rate", "error_event")]
)
def test_a_canary_that_breaks_streams_is_rolled_back_and_the_sdk_sees_the_breaks(
    option: str,
    kind: str,
    spawn: Callable[..., Any],
    tmp_path: Path,
    gateway_server: Callable[..., Any],
) -> None:
    """30 % of the canary's streams cut mid-answer (or carrying an SSE error payload)."""
    v1, _ = llm(spawn, tmp_path, "vllm-a", ttft_ms=10, tokens_per_s=400)
    v2, v2_log = llm(spawn, tmp_path, "vllm-b", ttft_ms=10, tokens_per_s=400, **{option: 0.3})
    doc = llm_flag(v1.url, v2.url, guard={"errors": ["status_5xx", kind]})
    gw = gateway_server(doc, env=TOKENS)
    outcomes = drive(gw.url, rolled_back(gw), threads=4)
    s = status(gw)
    assert s["state"] == "rolled_back" and s["reason"] == "sprt", s
    assert set(s["guard"]["error_kinds"]) == {kind}, s["guard"]
    ends = {r["request_id"]: r["event"] for r in records(v2_log) if r.get("event")}
    broken = {rid for rid, event in ends.items() if event == kind}
    assert broken, ends
    by_id = {o["request_id"]: o for o in outcomes}
    for rid in broken:
        # The SDK saw a failed transfer or an error, never a clean end (no finish_reason).
        assert "error" in by_id[rid] and "finish" not in by_id[rid], by_id[rid]
    for rid in set(ends) - broken:
        assert by_id[rid].get("finish") == "stop", by_id[rid]
    assert all("error" not in o for o in outcomes if o.get("variant") == "v1")
    print(f"canary streams broken ({kind}) before the rollback: {len(broken)} of {len(ends)}")

    # The gateway records a stream when its upstream body ends, which can be after the SDK
    # has seen the break and the drive returned: wait for the count to match the canary's log.
    def counted_as_logged() -> bool:
        logged = sum(1 for r in records(v2_log) if r.get("event") == kind)
        counted = metric(gw, "gateway_upstream_errors_total", flag="chat", kind=kind, variant="v2")
        return counted == logged

    wait_until(counted_as_logged, f"gateway_upstream_errors_total{{kind={kind}}} to match the log")


def test_error_events_count_though_the_sdk_hangs_up_on_them_before_the_stream_ends(
    spawn: Callable[..., Any], tmp_path: Path, gateway_server: Callable[..., Any]
) -> None:
    """The SDK raises on an error event and closes its connection; the upstream's stream goes
    on (here for 30 s). What the gateway relayed is the canary's failure all the same: each
    one the SDK saw is counted, and the guard rolls the canary back."""
    v1, _ = llm(spawn, tmp_path, "vllm-a", ttft_ms=10, tokens_per_s=400)
    v2, _ = llm(
        spawn, tmp_path, "vllm-b", ttft_ms=10, tokens_per_s=400, error_event_rate=1.0,
        error_hold_ms=30_000,
    )  # fmt: skip
    doc = llm_flag(v1.url, v2.url, guard={"errors": ["status_5xx", "error_event"]})
    gw = gateway_server(doc, env=TOKENS)
    outcomes = drive(gw.url, rolled_back(gw), threads=4, limit_s=60)
    s = status(gw)
    assert s["state"] == "rolled_back" and s["reason"] == "sprt", s
    assert set(s["guard"]["error_kinds"]) == {"error_event"}, s["guard"]
    seen = [o for o in outcomes if "error" in o]
    assert seen and all(o["error"] == "APIError" for o in seen), seen
    assert all(o.get("finish") == "stop" for o in outcomes if "error" not in o)

    def counted_as_seen() -> bool:
        counted = metric(
            gw, "gateway_upstream_errors_total", flag="chat", kind="error_event", variant="v2"
        )
        return counted == len(seen)

    wait_until(counted_as_seen, f"{len(seen)} error events counted for v2")


def test_a_canary_whose_first_token_comes_after_the_clients_gave_up_is_rolled_back(
    spawn: Callable[..., Any], tmp_path: Path, gateway_server: Callable[..., Any]
) -> None:
    """Clients time out after 1 s; the canary's first token would come after 5 s. A wait
    longer than `ttft_over` is the canary's failure however the stream would have gone on."""
    v1, _ = llm(spawn, tmp_path, "vllm-a", ttft_ms=10, tokens_per_s=400)
    v2, _ = llm(spawn, tmp_path, "vllm-b", ttft_ms=5000, tokens_per_s=400)
    doc = llm_flag(v1.url, v2.url, guard={"errors": ["status_5xx", "ttft_over:500"]})
    gw = gateway_server(doc, env=TOKENS)
    outcomes = drive(gw.url, rolled_back(gw), limit_s=90, timeout_s=1.0)
    s = status(gw)
    assert s["state"] == "rolled_back" and s["reason"] == "sprt", s
    assert set(s["guard"]["error_kinds"]) == {"ttft_over:500"}, s["guard"]
    assert any("error" in o for o in outcomes)
    assert all(o.get("variant") == "v1" for o in outcomes if "error" not in o)


def test_a_client_that_leaves_a_healthy_stream_is_not_counted_for_or_against_the_canary(
    spawn: Callable[..., Any], tmp_path: Path, gateway_server: Callable[..., Any]
) -> None:
    """A stream its client left before anything went wrong says nothing of the canary: it is
    neither a cut stream (the upstream did not cut it) nor a success (it might have failed
    later). Nothing is recorded; a stream read to its end is."""
    v1, _ = llm(spawn, tmp_path, "vllm-a", ttft_ms=10, tokens_per_s=400)
    v2, v2_log = llm(spawn, tmp_path, "vllm-b", ttft_ms=10, tokens_per_s=4)
    guard = {"errors": ["status_5xx", "stream_aborted", "ttft_over:2000"]}
    gw = gateway_server(llm_flag(v1.url, v2.url, guard=guard), env=TOKENS)
    canary_users = [
        u for u in (f"leaver-{i}" for i in range(200)) if expected_variant(u, 0.5) == "v2"
    ]
    client = sdk(gw.url, timeout=30)
    for user in canary_users[:8]:
        stream = client.chat.completions.create(
            model="llama", messages=MESSAGES, stream=True, user=user
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # one token of a 4 s answer, and the client goes
        stream.close()

    def gone() -> bool:
        return sum(1 for r in records(v2_log) if r.get("event") == "client_gone") == 8

    wait_until(gone, "the canary to see 8 clients gone")
    s = status(gw)
    assert s["state"] != "rolled_back" and s["guard"]["n"] == 0, s
    labels = {"flag": "chat", "variant": "v2"}
    assert metric(gw, "gateway_requests_total", code="200", **labels) == 0
    assert metric(gw, "gateway_upstream_errors_total", kind="stream_aborted", **labels) == 0
    whole = stream_chat(client, canary_users[8])
    assert whole["variant"] == "v2" and whole["finish"] == "stop", whole
    # The gateway records the stream once its upstream body has ended, as the SDK sees it end.
    s = wait_until(lambda: (s := status(gw))["guard"]["n"] == 1 and s, "the stream recorded")
    assert s["guard"]["k"] == 0, s
    assert metric(gw, "gateway_requests_total", code="200", **labels) == 1


def test_a_shadow_compared_on_ttft_matches_scipy_on_the_pair_log(
    spawn: Callable[..., Any], tmp_path: Path, gateway_server: Callable[..., Any]
) -> None:
    v1, _ = llm(spawn, tmp_path, "vllm-a", ttft_ms=30, tokens_per_s=200)
    v3, v3_log = llm(spawn, tmp_path, "vllm-c", ttft_ms=120, tokens_per_s=200)
    shadow = {"name": "v3", "upstream": v3.url, "model": "llama-v3", "metric": "ttft_ms"}
    pair_log = tmp_path / "pairs.jsonl"
    gw = gateway_server(
        llm_flag(v1.url, None, shadows=[shadow]),
        settings={"shadow": {"pair_log": str(pair_log)}},
        env=TOKENS,
    )
    client = sdk(gw.url)
    for i in range(40):
        stream_chat(client, f"u{i}")
    pairs = wait_for_lines(pair_log, 40)
    report = status(gw)["shadows"][0]
    assert report["n"] == len(pairs) == 40
    oracle = stats.ttest_rel(
        [p["shadow_value"] for p in pairs], [p["primary_value"] for p in pairs]
    )
    assert report["t"] == pytest.approx(float(oracle.statistic), rel=1e-9)
    assert report["p"] == pytest.approx(float(oracle.pvalue), rel=1e-9, abs=1e-300)
    assert 60 < report["mean_diff"] < 150  # 90 ms slower to its first event, loosely
    assert {r["model"] for r in records(v3_log) if "status" in r} == {"llama-v3"}


def wait_for_lines(path: Path, n: int, timeout_s: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        lines = records(path) if path.exists() else []
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.fixture
def one_llm(
    spawn: Callable[..., Any], tmp_path: Path, gateway_server: Callable[..., Any]
) -> tuple[Any, Path]:
    v1, log = llm(spawn, tmp_path, "vllm-a", ttft_ms=0, tokens_per_s=1000)
    return gateway_server(llm_flag(v1.url, None), env=TOKENS), log


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json at all", "not a JSON object"),
        (b'["model", "llama"]', "not a JSON object"),
        (b'{"model": 7, "user": "u"}', "is not a string"),
        (b'{"model": ["llama"]}', "is not a string"),
        (b'{"user": "u"}', 'no "model"'),
        (b'{"model": "gpt-4"}', "serves model 'gpt-4'"),
    ],
)
def test_a_body_that_names_no_routed_model_gets_a_clear_404(
    body: bytes, reason: str, one_llm: tuple[Any, Path]
) -> None:
    gw, log = one_llm
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=body)
    assert r.status_code == 404, r.text
    assert r.json()["error"] == "no_route" and reason in r.json()["message"], r.json()
    assert not log.exists() or records(log) == []  # nothing reached the upstream


def test_a_body_over_the_limit_gets_413(one_llm: tuple[Any, Path]) -> None:
    gw, log = one_llm
    big = b'{"model": "llama", "pad": "' + b"x" * (20 * 1024 * 1024) + b'"}'
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=big, timeout=60)
    assert r.status_code == 413, r.text

    def chunked() -> Iterator[bytes]:
        yield b'{"model": "llama", "pad": "'
        for _ in range(20):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    r = httpx.post(f"{gw.url}/v1/chat/completions", content=chunked(), timeout=60)
    assert r.status_code == 413, r.text
    assert not log.exists() or records(log) == []
    # Refused before the body could say which variant: counted for the flag, variant "".
    assert metric(gw, "gateway_requests_total", flag="chat", variant="", code="413") == 2.0


def test_the_llm_demo_rolls_back_a_canary_whose_ttft_regresses() -> None:
    done = subprocess.run(
        [str(GATEWAY_BIN), "demo", "--llm", "--duration", "20", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.rsplit("summary: ", 1)[1])
    assert summary["state"] == "rolled_back" and summary["reason"] == "sprt", summary
    assert set(summary["error_kinds"]) == {"ttft_over:500"} and summary["failed_streams"] == {}


# --- the relay of event streams, on each path ---------------------------------------------------
#
# An event stream is relayed one of three ways: pushed from the upstream's parser straight to
# the client's connection (server `fast`, a client that pushes: `aiohttp-direct`, `httptools`),
# pulled and written straight to the connection (`fast` with another client), or pulled and
# sent as ASGI messages (`stock`). Each must keep the same promises; a raw socket sees exactly
# what the client is sent.

RELAY_PATHS = [
    pytest.param("fast", "aiohttp-direct", id="push"),
    pytest.param("fast", "httptools", id="push-httptools"),
    pytest.param("fast", "httpx", id="pull-write"),
    pytest.param("stock", "aiohttp-direct", id="asgi"),
]


class RawStream:
    """One streamed chat completion on a raw socket: the head, then the chunked body decoded
    as it arrives. `ended` once the last chunk came; `broken` once the connection ended (a
    close or a reset) before it."""

    def __init__(self, port: int, body: dict[str, Any], request_id: str, **sock_opts: int):
        self.sock = socket.socket()
        for option, value in sock_opts.items():
            self.sock.setsockopt(socket.SOL_SOCKET, getattr(socket, option), value)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        self._raw = b""
        self.again(body, request_id)

    def again(self, body: dict[str, Any], request_id: str) -> None:
        """The next request, on the same connection (after the last one has ended)."""
        data = json.dumps(body).encode()
        self.sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
            b"content-type: application/json\r\nx-request-id: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (request_id.encode(), len(data), data)
        )
        self._body = b""
        self.head = b""
        self.ended = self.broken = False

    def _recv(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.broken = not self.ended
            return False
        self._raw += data
        return True

    def _decode(self) -> None:
        if not self.head:
            head, sep, rest = self._raw.partition(b"\r\n\r\n")
            if not sep:
                return
            self.head, self._raw = head, rest
        while not self.ended:
            line, sep, rest = self._raw.partition(b"\r\n")
            if not sep or len(rest) < int(line, 16) + 2:
                return
            size = int(line, 16)
            assert rest[size : size + 2] == b"\r\n", rest[: size + 2]
            self._body += rest[:size]
            self._raw = rest[size + 2 :]
            if size == 0:
                self.ended = True

    def next_event(self) -> bytes | None:
        """The next complete event, or None once the stream is over."""
        while True:
            event, sep, rest = self._body.partition(b"\n\n")
            if sep:
                self._body = rest
                return event
            if self.ended or self.broken or not self._recv():
                return None
            self._decode()

    def rest(self) -> list[bytes]:
        return list(iter(self.next_event, None))

    def close(self) -> None:
        self.sock.close()


def relay_gateway(
    gateway_server: Callable[..., Any], upstream: str, server: str, client: str
) -> Any:
    settings = {"upstream": {"client": client}}
    return gateway_server(
        llm_flag(upstream, None), settings=settings, env={**TOKENS, "GATEWAY_SERVER__HTTP": server}
    )


def ends_of(log: Path, request_id: str) -> list[dict[str, Any]]:
    events = ("stream_end", "stream_aborted", "error_event", "client_gone")
    return [
        r for r in records(log) if r.get("request_id") == request_id and r.get("event") in events
    ]


def content(event: bytes) -> str | None:
    if not event.startswith(b"data: {"):
        return None
    choices = json.loads(event[6:])["choices"]
    return choices[0]["delta"].get("content") if choices else None


@pytest.mark.parametrize(("server", "client"), RELAY_PATHS)
def test_each_event_reaches_the_client_before_the_upstream_has_finished(
    server: str,
    client: str,
    spawn: Callable[..., Any],
    tmp_path: Path,
    gateway_server: Callable[..., Any],
) -> None:
    v1, log = llm(spawn, tmp_path, "vllm-a", tokens_per_s=2, ttft_ms=10)
    gw = relay_gateway(gateway_server, v1.url, server, client)
    body = {"model": "llama", "stream": True, "user": "u1", "max_tokens": 3}
    stream = RawStream(gw.server.port, body, "first-early")
    try:
        first = stream.next_event()
        while first is not None and content(first) is None:
            first = stream.next_event()
        # Ordering, not timing: the first token was in the client's hands while the upstream
        # still had two tokens to send, half a second apart each.
        assert first is not None and ends_of(log, "first-early") == []
        events = [first, *stream.rest()]
        assert b"transfer-encoding: chunked" in stream.head.lower()
        assert stream.ended and not stream.broken
        # The connection is kept alive for the next request, which is answered whole too.
        stream.again({**body, "max_tokens": 2}, "next-1")
        next_events = stream.rest()
    finally:
        stream.close()
    assert len([e for e in events if content(e)]) == 3 and events[-1] == b"data: [DONE]"
    assert len([e for e in next_events if content(e)]) == 2 and next_events[-1] == b"data: [DONE]"
    assert stream.ended and not stream.broken
    end = wait_until(lambda: ends_of(log, "first-early"), "the upstream's end")
    assert [e["event"] for e in end] == ["stream_end"]
    labels = {"flag": "chat", "variant": "v1"}
    wait_until(lambda: metric(gw, "gateway_completion_tokens_total", **labels) == 5.0, "usage")
    assert metric(gw, "gateway_ttft_seconds_count", **labels) == 2.0


@pytest.mark.parametrize(("server", "client"), RELAY_PATHS)
def test_a_stream_the_upstream_cuts_reaches_the_client_broken_and_counts_stream_aborted(
    server: str,
    client: str,
    spawn: Callable[..., Any],
    tmp_path: Path,
    gateway_server: Callable[..., Any],
) -> None:
    # Every stream is cut after half its tokens: the upstream closes mid-chunked-body.
    v1, log = llm(spawn, tmp_path, "vllm-a", tokens_per_s=50, ttft_ms=10, abort_rate=1.0)
    gw = relay_gateway(gateway_server, v1.url, server, client)
    body = {"model": "llama", "stream": True, "user": "u1", "max_tokens": 8}
    stream = RawStream(gw.server.port, body, "cut-1")
    try:
        events = stream.rest()
    finally:
        stream.close()
    end = wait_until(lambda: ends_of(log, "cut-1"), "the upstream's end")
    assert [e["event"] for e in end] == ["stream_aborted"]
    # What came before the cut was relayed; then the body stops without its last chunk.
    assert len([e for e in events if content(e)]) == 4 and b"data: [DONE]" not in events
    assert stream.broken and not stream.ended
    labels = {"flag": "chat", "variant": "v1"}
    kind = "gateway_upstream_errors_total"
    wait_until(lambda: metric(gw, kind, kind="stream_aborted", **labels) == 1.0, "the count")
    assert metric(gw, kind, kind="mid_body", **labels) == 0.0


@pytest.mark.parametrize(("server", "client"), RELAY_PATHS)
def test_a_stream_that_stalls_past_the_read_timeout_is_cut_and_counted(
    server: str,
    client: str,
    spawn: Callable[..., Any],
    tmp_path: Path,
    gateway_server: Callable[..., Any],
) -> None:
    # The first token at once, the next 30 s later: far past the gateway's read timeout.
    v1, _ = llm(spawn, tmp_path, "vllm-a", tokens_per_s=1 / 30, ttft_ms=0)
    settings = {"upstream": {"client": client, "read_timeout_s": 1.0}}
    env = {**TOKENS, "GATEWAY_SERVER__HTTP": server}
    gw = gateway_server(llm_flag(v1.url, None), settings=settings, env=env)
    body = {"model": "llama", "stream": True, "user": "u1", "max_tokens": 3}
    stream = RawStream(gw.server.port, body, "stalls-1")
    try:
        events = stream.rest()
    finally:
        stream.close()
    assert [content(e) for e in events if content(e)] == [content(events[1])]  # token 0 only
    assert stream.broken and not stream.ended
    labels = {"flag": "chat", "variant": "v1"}
    kind = "gateway_upstream_errors_total"
    wait_until(lambda: metric(gw, kind, kind="stream_aborted", **labels) == 1.0, "the count")


@pytest.mark.parametrize(("server", "client"), RELAY_PATHS)
def test_a_stream_longer_than_the_read_timeout_with_shorter_gaps_arrives_whole(
    server: str,
    client: str,
    spawn: Callable[..., Any],
    tmp_path: Path,
    gateway_server: Callable[..., Any],
) -> None:
    # The read timeout bounds each wait for more of the body, not the body: 8 tokens 0.25 s
    # apart take 2 s, twice the timeout, and none of the waits comes near it.
    v1, _ = llm(spawn, tmp_path, "vllm-a", tokens_per_s=4, ttft_ms=0)
    settings = {"upstream": {"client": client, "read_timeout_s": 1.0}}
    env = {**TOKENS, "GATEWAY_SERVER__HTTP": server}
    gw = gateway_server(llm_flag(v1.url, None), settings=settings, env=env)
    body = {"model": "llama", "stream": True, "user": "u1", "max_tokens": 8}
    stream = RawStream(gw.server.port, body, "long-1")
    try:
        events = stream.rest()
    finally:
        stream.close()
    assert len([e for e in events if content(e)]) == 8 and events[-1] == b"data: [DONE]"
    assert stream.ended and not stream.broken
    labels = {"flag": "chat", "variant": "v1"}
    assert metric(gw, "gateway_upstream_errors_total", kind="stream_aborted", **labels) == 0.0


@pytest.mark.parametrize(("server", "client"), RELAY_PATHS)
def test_a_client_that_leaves_mid_stream_stops_the_upstream(
    server: str,
    client: str,
    spawn: Callable[..., Any],
    tmp_path: Path,
    gateway_server: Callable[..., Any],
) -> None:
    v1, log = llm(spawn, tmp_path, "vllm-a", tokens_per_s=5, ttft_ms=10)
    gw = relay_gateway(gateway_server, v1.url, server, client)
    body = {"model": "llama", "stream": True, "user": "u1", "max_tokens": 100}  # 20 s
    stream = RawStream(gw.server.port, body, "leaves-1")
    try:
        while (event := stream.next_event()) is not None and content(event) is None:
            pass
        assert event is not None
    finally:
        stream.close()
    gone = wait_until(lambda: ends_of(log, "leaves-1"), "the upstream's end", within_s=60)
    assert [e["event"] for e in gone] == ["client_gone"] and gone[0]["tokens"] < 100
    # Not the upstream's failure: no error is counted (the departed stream is not recorded at
    # all, as a request whose client left never was), and the next stream is served whole.
    labels = {"flag": "chat", "variant": "v1"}
    for kind in ("stream_aborted", "mid_body"):
        assert metric(gw, "gateway_upstream_errors_total", kind=kind, **labels) == 0.0
    assert metric(gw, "gateway_ttft_seconds_count", **labels) == 0.0
    again = RawStream(gw.server.port, {**body, "max_tokens": 2}, "after-1")
    try:
        assert again.rest()[-1] == b"data: [DONE]" and again.ended
    finally:
        again.close()


def upstream_receive_queues(upstream_port: int) -> list[int]:
    """The bytes waiting in the receive queue of each connection to `upstream_port` (the
    gateway's side: received by the kernel, not yet read by the gateway)."""
    queues = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].rpartition(":")[2], 16)
        if remote_port == upstream_port:
            queues.append(int(fields[4].partition(":")[2], 16))
    return queues


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.parametrize(("server", "client"), RELAY_PATHS)
def test_a_client_that_does_not_read_stops_the_gateway_reading_the_upstream(
    server: str,
    client: str,
    spawn: Callable[..., Any],
    tmp_path: Path,
    gateway_server: Callable[..., Any],
) -> None:
    tokens = 100_000  # about 19 MB of events, sent as fast as the connections take them
    v1, log = llm(spawn, tmp_path, "vllm-a", tokens_per_s=1e9, ttft_ms=0)
    gw = relay_gateway(gateway_server, v1.url, server, client)
    pid = gw.server.process.pid
    body = {"model": "llama", "stream": True, "user": "u1", "max_tokens": tokens}
    # One short stream first: what the path allocates once (a client's pool, an SSL context)
    # is not what this test is about.
    warm = httpx.post(f"{gw.url}/v1/chat/completions", json={**body, "max_tokens": 10}, timeout=30)
    assert warm.status_code == 200 and warm.text.rstrip().endswith("data: [DONE]"), warm.text
    before = rss_bytes(pid)
    stream = RawStream(gw.server.port, body, "stalled-1", SO_RCVBUF=4096)
    try:
        assert stream.next_event() is not None  # the head and a first event, then no reading

        seen: list[list[int]] = []

        def gateway_stopped_reading() -> bool:
            # The gateway has stopped reading from the upstream: the bytes the kernel holds
            # for it stay there, unread, look after look.
            seen.append(upstream_receive_queues(v1.port))
            last = seen[-4:]
            return len(last) == 4 and all(q == last[0] for q in last) and sum(last[0]) > 0

        wait_until(gateway_stopped_reading, "the gateway to stop reading the upstream", within_s=60)
        grown = rss_bytes(pid) - before
        # Held by the gateway meanwhile: its own buffers, not the stream.
        assert grown < 8 * 1024 * 1024, grown
        events = stream.rest()  # now read all of it: nothing was lost on the way
    finally:
        stream.close()
    assert stream.ended and events[-1] == b"data: [DONE]"
    assert len([e for e in events if content(e)]) == tokens  # the first event read was the role
    end = wait_until(lambda: ends_of(log, "stalled-1"), "the upstream's end")
    assert [e["event"] for e in end] == ["stream_end"]
