"""Failing upstreams and hostile clients against a real `gateway serve` (DESIGN 10), with every
upstream client (`upstream.client`): raw sockets on the client side, the bundled model server
upstream.

- An upstream that fails after the response head went out: the client's connection is
  aborted (never a clean short body), the request counts as a `mid_body` error in the metrics
  and for the guard, `on_canary_error: fallback` notwithstanding.
- An upstream that answers garbage: 502 `bad_response`.
- A streamed request body over `upstream.max_body_bytes`: 413, and the upstream never gets a
  complete request (its access log shows the body cut off, no answer).
- Header values with obs-text (0x80-0xFF): forwarded byte for byte or refused with 400 (the
  stock aiohttp client, for bytes that are not UTF-8), counted; never altered.
- HTTP/0.9 request lines: 400.
- Slow, idle and too many connections: closed by `limits.head_timeout_s` and
  `limits.max_connections`, counted in `gateway_connections_refused_total`, while a normal
  client is served throughout.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import flag_doc
from prometheus_client import generate_latest
from scrape import metric
from waiting import wait_until

from gateway.app import create_app
from gateway.settings import load_settings

CLIENTS = ["aiohttp-direct", "httptools", "aiohttp", "httpx"]
RULES = [{"if": {"header": "x-canary", "equals": "always"}, "then": "canary"}]
OPERATOR = "ops-token-123456"
TOKENS = {"GATEWAY_ADMIN_TOKENS": f"ops:operator:{OPERATOR}"}


# --- helpers ---------------------------------------------------------------------------------


def guard(gw: Any) -> dict[str, Any]:
    r = httpx.get(
        f"{gw.admin_url}/admin/flags/sentiment/status",
        headers={"authorization": f"Bearer {OPERATOR}"},
    )
    assert r.status_code == 200, r.text
    return dict(r.json()["guard"])


def read_all(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the server sends until it closes; True if it reset the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, False
        data += chunk


def complete_message(data: bytes) -> bool:
    """Whether `data` holds one whole HTTP response (by Content-Length or chunked framing)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    fields = dict(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    )
    if b"content-length" in fields:
        return len(body) >= int(fields[b"content-length"])
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size_line, sep, rest = body.partition(b"\r\n")
            if not sep:
                return False
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return True
            if len(rest) < size + 2:
                return False
            body = rest[size + 2 :]
    return False


def exchange(port: int, request: bytes, *, timeout_s: float = 20.0) -> tuple[bytes, bool]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        return read_all(sock)


def status_of(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data.split(b" ", 2)[1])


def access_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- an upstream that fails after the response head ------------------------------------------


@pytest.mark.parametrize("hook", ["_cut", "_cut_chunked"])
@pytest.mark.parametrize("client", CLIENTS)
def test_upstream_failing_mid_body_aborts_the_client_and_counts_as_a_guard_error(
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
    client: str,
    hook: str,
) -> None:
    stable, canary = model_server("v1"), model_server("v2")
    # Weight 0 and a rule: only this test's request reaches the canary. Fallback is on: it
    # cannot apply once the head has gone out, and must not hide the failure.
    doc = flag_doc(stable.url, canary.url, weight=0.0, rules=RULES, on_canary_error="fallback")
    gw = gateway_server(doc, settings={"upstream": {"client": client}}, env=TOKENS)
    before = guard(gw)

    request = (
        f"GET /v1/sentiment/{hook}/1000 HTTP/1.1\r\nHost: gw\r\nx-canary: always\r\n\r\n"
    ).encode()
    data, reset = exchange(gw.server.port, request)

    assert status_of(data) == 200, data[:300]  # the head went out before the upstream failed
    assert b"x-gateway-variant: v2" in data.lower()
    assert not complete_message(data), data[:300]  # a failed transfer, never a clean one
    print(f"{client} {hook}: {len(data)} bytes, then {'a reset' if reset else 'a close'}")
    kinds = {"flag": "sentiment", "variant": "v2"}
    wait_until(
        lambda: metric(gw, "gateway_upstream_errors_total", **kinds, kind="mid_body") == 1.0,
        "the mid_body error to be counted",
    )
    assert metric(gw, "gateway_requests_total", **kinds, code="200") == 1.0
    assert metric(gw, "gateway_upstream_errors_total", **kinds, kind="connect_error") == 0.0
    after = guard(gw)
    assert (after["n"], after["k"]) == (before["n"] + 1, before["k"] + 1), (before, after)
    # The gateway serves on: the next request on a new connection is whole.
    ok = httpx.get(f"{gw.url}/v1/sentiment/x", headers={"x-canary": "always"}, timeout=20)
    assert ok.status_code == 200 and ok.headers["x-gateway-variant"] == "v2"


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_under_a_plain_asgi_server_the_client_sees_a_failed_transfer_too(
    model_server: Callable[..., Any],
    uvicorn_app: Callable[..., Any],
    tmp_path: Path,
    http: str,
) -> None:
    """The data-plane app under a stock uvicorn (h11: no direct abort, the app raises and the
    server closes the connection mid-response; httptools: reset as under `gateway serve`)."""
    stable = model_server("v1")
    flags_file = tmp_path / "flags.yaml"
    flags_file.write_text(json.dumps(flag_doc(stable.url, None)))
    settings = load_settings(None, env={}, overrides={"store.flags_file": str(flags_file)})
    gateway = create_app(settings)
    handle = uvicorn_app(gateway.data_app, http=http, lifespan="on")

    for hook in ("_cut", "_cut_chunked"):
        request = f"GET /v1/sentiment/{hook}/1000 HTTP/1.1\r\nHost: gw\r\n\r\n".encode()
        data, _ = exchange(handle.port, request)
        assert status_of(data) == 200, data[:300]
        assert not complete_message(data), data[:300]
    exposed = generate_latest(gateway.registry).decode()
    sample = 'gateway_upstream_errors_total{flag="sentiment",kind="mid_body",variant="v1"} 2.0'
    assert sample in exposed, [line for line in exposed.splitlines() if "upstream_err" in line]


@pytest.mark.parametrize("client", CLIENTS)
def test_garbage_from_the_upstream_is_a_bad_response(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any], client: str
) -> None:
    stable = model_server("v1")
    gw = gateway_server(flag_doc(stable.url, None), settings={"upstream": {"client": client}})
    r = httpx.get(f"{gw.url}/v1/sentiment/_garbage", timeout=20)
    assert r.status_code == 502, r.text
    assert r.json()["error"] == "bad_response"
    labels = {"flag": "sentiment", "variant": "v1"}
    assert metric(gw, "gateway_upstream_errors_total", **labels, kind="bad_response") == 1.0
    assert metric(gw, "gateway_upstream_errors_total", **labels, kind="connect_error") == 0.0


# --- request bodies and header bytes ---------------------------------------------------------


@pytest.mark.parametrize(
    "limit",
    # Under the 64 KiB the gateway buffers before it sends upstream: crossed while buffering.
    # Over it: the body is streamed upstream, and crossed while streaming, or while buffering
    # when the server hands the gateway more than the limit at once (a loaded machine).
    [32 * 1024, 256 * 1024],
    ids=["crossed-buffering", "crossed-streaming"],
)
@pytest.mark.parametrize("client", CLIENTS)
def test_chunked_body_over_the_limit_is_413_and_never_reaches_the_upstream_whole(
    model_server: Callable[..., Any],
    gateway_server: Callable[..., Any],
    tmp_path: Path,
    client: str,
    limit: int,
) -> None:
    log_file = tmp_path / "upstream.log"
    stable = model_server("v1", access_log=log_file)
    settings = {"upstream": {"client": client, "max_body_bytes": limit, "mirror_max_body_bytes": 0}}
    gw = gateway_server(flag_doc(stable.url, None), settings=settings)
    chunk = b"%x\r\n%s\r\n" % (16 * 1024, b"b" * 16 * 1024)

    with socket.create_connection(("127.0.0.1", gw.server.port), timeout=20) as sock:
        sock.sendall(
            b"POST /v1/sentiment/big HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        )

        def body() -> None:  # 1 MiB, on its own thread: the answer may come before its end
            try:
                for _ in range(64):
                    sock.sendall(chunk)
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the gateway answered and closed first

        sender = threading.Thread(target=body, daemon=True)
        sender.start()
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            assert data, f"closed without an answer: {head!r}"
            head += data
        sender.join(timeout=20)

    assert status_of(head) == 413, head
    # Counted once the exchange has ended, which may be just after the answer went out.
    wait_until(
        lambda: (
            metric(gw, "gateway_requests_total", flag="sentiment", variant="v1", code="413") == 1.0
        ),
        "the 413 to be counted",
    )
    # The same upstream still serves a body under the limit, streamed the same way; once it has
    # logged that one, it has logged whatever it saw of the big one before.
    ok = httpx.post(f"{gw.url}/v1/sentiment/ok", content=iter([b"a" * (limit // 2)]), timeout=20)
    assert ok.status_code == 200, ok.text
    wait_until(
        lambda: [r for r in access_log(log_file) if r["path"] == "/v1/sentiment/ok"],
        "the upstream to log the request under the limit",
    )
    # The upstream saw a body cut off (its connection dropped) and answered nothing, or, when
    # the limit was crossed before its head had been read, nothing at all: never a whole body.
    records = [r for r in access_log(log_file) if r["path"] == "/v1/sentiment/big"]
    assert all(r.get("event") == "request_aborted" for r in records), records
    assert all(r["body_bytes"] <= limit for r in records), records


def forwards_unchanged(client: str, value: bytes) -> bool:
    """Whether `client` puts header bytes outside ASCII on the wire as they came (DESIGN 10:
    forwarded, or refused with 400, never altered). The direct client and httpx write the
    bytes; the stock aiohttp client writes header strings as UTF-8, so it forwards bytes that
    are UTF-8 and refuses the others (gateway/dataplane/upstream/aiohttp_client.py)."""
    if client != "aiohttp":
        return True
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("value", [b"caf\xe9", b"caf\xc3\xa9"], ids=["latin-1", "utf-8"])
@pytest.mark.parametrize("client", CLIENTS)
def test_obs_text_header_values_are_forwarded_byte_for_byte_or_refused_and_counted(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any], client: str, value: bytes
) -> None:
    stable = model_server("v1")
    gw = gateway_server(flag_doc(stable.url, None), settings={"upstream": {"client": client}})
    request = (
        b"GET /v1/sentiment/x HTTP/1.1\r\nHost: gw\r\nx-a: %s\r\nConnection: close\r\n\r\n" % value
    )
    data, _ = exchange(gw.server.port, request)

    status = status_of(data)
    if forwards_unchanged(client, value):
        assert status == 200, data[:500]
        echo = json.loads(data.partition(b"\r\n\r\n")[2])
        assert echo["headers"]["x-a"] == value.decode("latin-1")  # the bytes sent, none changed
    else:
        assert status == 400, data[:500]
        assert json.loads(data.partition(b"\r\n\r\n")[2])["error"] == "bad_request"
    labels = {"flag": "sentiment", "variant": "v1", "code": str(status)}
    assert metric(gw, "gateway_requests_total", **labels) == 1.0


@pytest.mark.parametrize(
    "line", [b"GET /v1/sentiment/x\r\n\r\n", b"GET /v1/sentiment/x HTTP/0.9\r\n\r\n"]
)
def test_http_0_9_request_lines_are_refused(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any], line: bytes
) -> None:
    stable = model_server("v1")
    gw = gateway_server(flag_doc(stable.url, None))
    data, _ = exchange(gw.server.port, line)
    assert status_of(data) == 400, data
    assert b"x-model" not in data.lower()


# --- slow, idle and too many connections -----------------------------------------------------

HEAD_TIMEOUT_S = 2.0


def assert_kept_alive_heads_are_held_and_served(
    gw: Any, started: list[tuple[socket.socket, bytes]]
) -> None:
    """Stock's side of the kept-alive head test: each served connection, given the start of its
    next head (or nothing), is still open two head timeouts later and is served once the head
    completes, and nothing is counted as a head timeout."""
    for sock, head in started:
        sock.sendall(head)
    time.sleep(HEAD_TIMEOUT_S * 2)  # past the deadline the fast protocol would keep
    assert [closed_by_server(sock) for sock, _ in started] == [None] * len(started)
    for sock, head in started:
        sock.setblocking(True)
        sock.settimeout(20)
        sock.sendall(b"\r\n\r\n" if head else b"GET /v1/sentiment/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        data = b""
        while not complete_message(data):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert status_of(data) == 200
    assert metric(gw, "gateway_connections_refused_total", reason="head_timeout") == 0.0


def assert_slow_heads_are_held_and_served(gw: Any, head: bytes, count: int) -> None:
    """uvicorn's own protocol (`server.http: stock`) sets no deadline for a request head: the
    connections stay open past `HEAD_TIMEOUT_S`, nothing is counted, and each head is served
    once it completes (docs/fast-path.md, "What stock keeps")."""
    socks = [socket.create_connection(("127.0.0.1", gw.server.port)) for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(head)
        time.sleep(HEAD_TIMEOUT_S * 2)  # past the deadline the fast protocol would keep
        assert [closed_by_server(sock) for sock in socks] == [None] * count
        for sock in socks:
            sock.setblocking(True)
            sock.settimeout(20)
            sock.sendall(
                b"\r\n\r\n" if head else b"GET /v1/sentiment/x HTTP/1.1\r\nHost: gw\r\n\r\n"
            )
        answers = []
        for sock in socks:
            data = b""
            while not complete_message(data):
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            answers.append(status_of(data))
        assert answers == [200] * count
    finally:
        for sock in socks:
            sock.close()
    assert metric(gw, "gateway_connections_refused_total", reason="head_timeout") == 0.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Served:
    """A normal client on its own thread: a request every 100 ms, each on a new connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Served:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = httpx.get(f"{self.url}/v1/sentiment/x", timeout=20)
                self.answers.append(r.status_code)
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            self._stop.wait(0.1)


def closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing, or None while the connection is still open."""
    sock.setblocking(False)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return data


def test_slowloris_heads_are_closed_with_408_while_others_are_served(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any], server_kind: str
) -> None:
    stable = model_server("v1")
    limits = {"head_timeout_s": HEAD_TIMEOUT_S, "keepalive_timeout_s": 60}
    gw = gateway_server(flag_doc(stable.url, None), settings={"limits": limits})
    pid = gw.server.process.pid
    rss_before = rss_kib(pid)
    head = b"GET /v1/sentiment/x HTTP/1.1\r\nHost: gw\r\nx-slow: " + b"a" * 1000
    if server_kind == "stock":
        assert_slow_heads_are_held_and_served(gw, head, 20)
        return

    with Served(gw.url) as served:
        socks = [socket.create_connection(("127.0.0.1", gw.server.port)) for _ in range(200)]
        opened = time.monotonic()
        closed: dict[int, tuple[float, bytes]] = {}
        rss_held = rss_kib(pid)
        sent = 0
        while len(closed) < len(socks):
            assert time.monotonic() - opened < 60, f"{len(socks) - len(closed)} still open"
            for i, sock in enumerate(socks):  # one more header byte a second on each
                if i in closed:
                    continue
                got = closed_by_server(sock)
                if got is not None:
                    closed[i] = (time.monotonic() - opened, got)
                    continue
                try:
                    sock.send(head[sent : sent + 1])
                except OSError:
                    closed[i] = (time.monotonic() - opened, b"")
            rss_held = max(rss_held, rss_kib(pid))
            sent += 1
            time.sleep(1.0)
        for sock in socks:
            sock.close()
        time.sleep(0.5)

    slowest = max(t for t, _ in closed.values())
    print(
        f"200 slow heads: RSS {rss_before} KiB before, {rss_held} KiB at most while held; "
        f"all closed {slowest:.1f} s after opening (head timeout {HEAD_TIMEOUT_S} s)"
    )
    answered = [got for _, got in closed.values() if got]
    assert answered, "no connection got an answer before the close"
    assert all(got.startswith(b"HTTP/1.1 408 ") for got in answered), answered[:3]
    assert metric(gw, "gateway_connections_refused_total", reason="head_timeout") == 200.0
    assert served.failures == [] and set(served.answers) == {200}, served.failures[:3]
    assert len(served.answers) >= 5


def test_connections_that_send_nothing_are_closed_after_the_head_timeout(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any], server_kind: str
) -> None:
    stable = model_server("v1")
    limits = {"head_timeout_s": HEAD_TIMEOUT_S}
    gw = gateway_server(flag_doc(stable.url, None), settings={"limits": limits})
    if server_kind == "stock":
        assert_slow_heads_are_held_and_served(gw, b"", 20)
        return
    socks = [socket.create_connection(("127.0.0.1", gw.server.port)) for _ in range(50)]
    try:
        opened = time.monotonic()
        results = wait_until(
            lambda: (
                all(r is not None for r in (closed_by_server(s) for s in socks))
                and [closed_by_server(s) for s in socks]
            ),
            "every idle connection to be closed",
            within_s=30.0,
        )
        print(f"50 idle connections closed {time.monotonic() - opened:.1f} s after opening")
    finally:
        for sock in socks:
            sock.close()
    assert results == [b""] * 50  # nothing began, so nothing is answered
    assert metric(gw, "gateway_connections_refused_total", reason="head_timeout") == 50.0


def test_connections_beyond_max_connections_are_refused_and_the_others_still_work(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any], server_kind: str
) -> None:
    stable = model_server("v1")
    limits = {"max_connections": 100, "head_timeout_s": 60, "keepalive_timeout_s": 60}
    gw = gateway_server(flag_doc(stable.url, None), settings={"limits": limits})
    request = b"GET /v1/sentiment/x HTTP/1.1\r\nHost: gw\r\n\r\n"

    def ask(sock: socket.socket) -> int:
        sock.setblocking(True)
        sock.settimeout(20)
        sock.sendall(request)
        data = b""
        while not complete_message(data):
            chunk = sock.recv(65536)
            assert chunk, f"closed: {data!r}"
            data += chunk
        return status_of(data)

    socks = [socket.create_connection(("127.0.0.1", gw.server.port)) for _ in range(100)]
    try:
        assert [ask(s) for s in socks] == [200] * 100  # all 100 accepted and kept open
        with socket.create_connection(("127.0.0.1", gw.server.port), timeout=20) as extra:
            if server_kind == "fast":
                with contextlib.suppress(OSError):  # already reset
                    extra.sendall(request)
                data, _ = read_all(extra)
                assert data == b"", data  # refused without an answer
            else:  # stock: uvicorn's 503 instead, and nothing counted (docs/fast-path.md)
                assert ask(extra) == 503
        refused = 1.0 if server_kind == "fast" else 0.0  # only the fast protocol counts it
        assert metric(gw, "gateway_connections_refused_total", reason="max_connections") == refused
        assert [ask(s) for s in socks] == [200] * 100
    finally:
        for sock in socks:
            sock.close()


def test_an_idle_kept_alive_connection_is_closed_and_counted(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any], server_kind: str
) -> None:
    stable = model_server("v1")
    limits = {"keepalive_timeout_s": 1, "head_timeout_s": 60}
    gw = gateway_server(flag_doc(stable.url, None), settings={"limits": limits})
    with socket.create_connection(("127.0.0.1", gw.server.port), timeout=20) as sock:
        sock.sendall(b"GET /v1/sentiment/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        data = b""
        while not complete_message(data):
            data += sock.recv(65536)
        assert status_of(data) == 200
        rest, _ = read_all(sock)  # blocks until the gateway closes the idle connection
    assert rest == b""
    counted = 1.0 if server_kind == "fast" else 0.0  # only the fast protocol counts it
    assert metric(gw, "gateway_connections_refused_total", reason="keepalive_timeout") == counted
    assert metric(gw, "gateway_connections_refused_total", reason="head_timeout") == 0.0


def test_a_kept_alive_connection_dripping_its_next_head_gets_408_and_an_idle_one_stays(
    model_server: Callable[..., Any], gateway_server: Callable[..., Any], server_kind: str
) -> None:
    """After a served request, the next head's clock starts with its first bytes: a head
    dripped a byte a second is closed with 408, while a connection that only waits is the
    keep-alive timeout's (60 s here), not the head timeout's, and is served when it asks.
    Stock sets no head deadline: both connections are held and served (docs/fast-path.md)."""
    stable = model_server("v1")
    limits = {"head_timeout_s": HEAD_TIMEOUT_S, "keepalive_timeout_s": 60}
    gw = gateway_server(flag_doc(stable.url, None), settings={"limits": limits})
    request = b"GET /v1/sentiment/x HTTP/1.1\r\nHost: gw\r\n\r\n"

    def served_once() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", gw.server.port), timeout=20)
        sock.sendall(request)
        data = b""
        while not complete_message(data):
            data += sock.recv(65536)
        assert status_of(data) == 200
        return sock

    dripping, idle = served_once(), served_once()
    head = b"GET /v1/sentiment/x HTTP/1.1\r\nHost: gw\r\nx-slow: " + b"a" * 100
    if server_kind == "stock":
        try:
            assert_kept_alive_heads_are_held_and_served(gw, [(dripping, head), (idle, b"")])
        finally:
            dripping.close()
            idle.close()
        return
    try:
        sent = 0
        got = None
        while got is None:
            assert sent < len(head), "the dripped head was never timed out"
            with contextlib.suppress(OSError):
                dripping.send(head[sent : sent + 1])
            sent += 1
            time.sleep(1.0)
            got = closed_by_server(dripping)
        assert got.startswith(b"HTTP/1.1 408 "), got
        # Two head timeouts later, the idle connection is still open, and served.
        time.sleep(2 * HEAD_TIMEOUT_S)
        assert closed_by_server(idle) is None
        idle.setblocking(True)
        idle.sendall(request)
        data = b""
        while not complete_message(data):
            chunk = idle.recv(65536)
            assert chunk, f"closed: {data!r}"
            data += chunk
        assert status_of(data) == 200
    finally:
        dripping.close()
        idle.close()
    assert metric(gw, "gateway_connections_refused_total", reason="head_timeout") == 1.0
