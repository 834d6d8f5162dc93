"""What the gateway's upstream clients put on the wire and how they read odd answers.

The upstream here is a scripted HTTP/1.1 server on a loopback socket: it reads each request
head and body, records them with the connection they came on, and answers what the test
scripts, or closes the connection without answering (and after any answer that says
`Connection: close`). The gateway in front of it is a real
`gateway serve`, with each upstream client (`upstream.client`). The httptools client (the
default) and the direct client (`aiohttp-direct`) write request heads themselves and read
answers with httptools' parser and with aiohttp's protocol (gateway/dataplane/fast/
aiohttp_client.py); the stock `aiohttp` client and `httpx` go through their libraries' public
APIs. Framing, Host, interim responses, HEAD and connection reuse are checked byte for byte
here for all four.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from conftest import flag_doc, raw_http

from gateway.dataplane.upstream.wire import TurnWrites

CLIENTS = ["aiohttp-direct", "httptools", "aiohttp", "httpx"]


@dataclass(frozen=True)
class Seen:
    connection: int  # 0 for the first connection the upstream accepted, 1 for the next...
    index: int  # the request's position on its connection
    head: bytes
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def fields(self) -> list[tuple[bytes, bytes]]:
        lines = self.head.split(b"\r\n")[1:]
        return [(n.strip().lower(), v.strip()) for n, _, v in (x.partition(b":") for x in lines)]

    def field(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.fields if n == name), None)


Answer = Callable[[Seen], bytes | None]  # None: close the connection without answering


@dataclass
class ScriptedUpstream:
    answer: Answer
    sock: socket.socket
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve(self) -> None:
        for number in range(10_000):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn, number), daemon=True).start()

    def _connection(self, conn: socket.socket, number: int) -> None:
        with conn:
            read = _Reader(conn)
            for index in range(10_000):
                head = read.until(b"\r\n\r\n")
                if head is None:
                    return
                seen = Seen(number, index, head, b"")
                if seen.field(b"transfer-encoding") == b"chunked":
                    body = b""
                    while size := int(read.until(b"\r\n") or b"0", 16):
                        body += read.exactly(size + 2)[:size]
                    read.until(b"\r\n")  # no trailers: the empty line
                else:
                    body = read.exactly(int(seen.field(b"content-length") or 0))
                seen = Seen(number, index, head, body)
                self.seen.append(seen)
                reply = self.answer(seen)
                if reply is None:
                    return
                conn.sendall(reply)
                if b"connection: close" in reply.partition(b"\r\n\r\n")[0].lower():
                    return  # as it said it would


@dataclass
class _Reader:
    conn: socket.socket
    buffer: bytes = b""

    def until(self, end: bytes) -> bytes | None:
        """What comes before `end` (consumed too); None if the peer closed first."""
        while end not in self.buffer:
            chunk = self.conn.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(end)
        return line

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.buffer += self.conn.recv(65536)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data


@pytest.fixture
def upstream() -> Iterator[Callable[..., ScriptedUpstream]]:
    """`upstream(answer, host="127.0.0.1")`: a scripted upstream listening on `host`."""
    started: list[ScriptedUpstream] = []

    def start(answer: Answer, host: str = "127.0.0.1") -> ScriptedUpstream:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = ScriptedUpstream(answer, socket.create_server((host, 0), family=family))
        threading.Thread(target=server.serve, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.sock.close()


def ok(body: bytes = b"ok", *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"Content-Length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _gateway(gateway_server: Callable[..., Any], url: str, client: str) -> Any:
    return gateway_server(flag_doc(url, None), settings={"upstream": {"client": client}})


@pytest.mark.parametrize("client", CLIENTS)
def test_request_framing_host_and_no_invented_headers(
    client: str, upstream: Callable[[Answer], ScriptedUpstream], gateway_server: Callable[..., Any]
) -> None:
    up = upstream(lambda seen: ok())
    gw = _gateway(gateway_server, up.url, client)
    port = int(gw.url.rsplit(":", 1)[1])
    get = b"GET /v1/sentiment/a?q=1 HTTP/1.1\r\nHost: example.test\r\nX-User-Id: u1\r\n\r\n"
    post = b"POST /v1/sentiment HTTP/1.1\r\nHost: example.test\r\nContent-Length: 0\r\n\r\n"
    put = b"PUT /v1/sentiment HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\n\r\nabc"
    for request in (get, post, put):
        status, body = raw_http(port, request)
        assert (status, body) == (200, b"ok")
    sent_get, sent_post, sent_put = up.seen
    assert sent_get.request_line == b"GET /v1/sentiment/a?q=1 HTTP/1.1"
    assert sent_get.field(b"host") == up.url.removeprefix("http://").encode()
    assert sent_get.field(b"x-forwarded-host") == b"example.test"
    assert sent_get.field(b"x-user-id") == b"u1"
    assert sent_get.field(b"content-length") is None
    assert sent_get.field(b"transfer-encoding") is None
    names = {name for name, _ in sent_get.fields}
    assert not names & {b"user-agent", b"accept", b"accept-encoding", b"content-type"}, names
    assert sent_post.field(b"content-length") == b"0"
    assert (sent_put.field(b"content-length"), sent_put.body) == (b"3", b"abc")
    assert [name for name, _ in sent_put.fields].count(b"host") == 1


@pytest.mark.parametrize("client", CLIENTS)
def test_interim_1xx_answers_are_skipped(
    client: str, upstream: Callable[[Answer], ScriptedUpstream], gateway_server: Callable[..., Any]
) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    up = upstream(lambda seen: early + ok(b"final"))
    gw = _gateway(gateway_server, up.url, client)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for _ in range(3):  # and the connection is still usable after one
            r = c.post("/v1/sentiment", content=b"{}")
            assert (r.status_code, r.content) == (200, b"final")
            assert "link" not in r.headers


@pytest.mark.parametrize("client", CLIENTS)
def test_head_answer_without_body_is_complete_and_the_connection_is_reused(
    client: str, upstream: Callable[[Answer], ScriptedUpstream], gateway_server: Callable[..., Any]
) -> None:
    def answer(seen: Seen) -> bytes:
        if seen.request_line.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"  # the length GET would have
        return ok(b"hello")

    up = upstream(answer)
    gw = _gateway(gateway_server, up.url, client)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        head = c.head("/v1/sentiment")
        get = c.get("/v1/sentiment")
    assert (head.status_code, head.headers["content-length"], head.content) == (200, "5", b"")
    assert (get.status_code, get.content) == (200, b"hello")
    assert [s.connection for s in up.seen] == [0, 0]


def chunked(*chunks: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body


@pytest.mark.parametrize("client", CLIENTS)
def test_answers_of_every_framing_follow_one_another_on_one_connection(
    client: str, upstream: Callable[[Answer], ScriptedUpstream], gateway_server: Callable[..., Any]
) -> None:
    """The direct client keeps one response parser per connection (gateway/dataplane/fast/
    aiohttp_client.py): each answer must start clean after the one before, whatever framed it,
    after a HEAD, and after a streamed request that went through aiohttp's ClientSession. The
    stock clients must reuse the connection for all of them too."""
    script = [
        ("GET", ok(b"length")),
        ("GET", chunked(b"chun", b"ked")),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("POST", ok(b"")),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"),
        ("GET", chunked(b"after head")),
        ("PUT", ok(b"streamed")),  # a 2 MiB body: ClientSession's parser on this connection
        ("GET", ok(b"last")),
    ]
    up = upstream(lambda seen: script[seen.index][1])
    gw = _gateway(gateway_server, up.url, client)
    got = []
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for method, _ in script:
            body = (
                b"x" * (2 * 1024 * 1024) if method == "PUT" else b"{}" if method == "POST" else None
            )
            r = c.request(method, "/v1/sentiment", content=body)
            got.append((r.status_code, r.content))
    assert got == [
        (200, b"length"),
        (200, b"chunked"),
        (204, b""),
        (200, b""),
        (200, b""),
        (200, b"after head"),
        (200, b"streamed"),
        (200, b"last"),
    ]
    assert [(s.connection, s.request_line.split()[0].decode()) for s in up.seen] == [
        (0, method) for method, _ in script
    ]


@pytest.mark.parametrize("client", CLIENTS)
def test_bodies_of_every_size_are_whole_and_the_connection_serves_the_next_answer(
    client: str, upstream: Callable[[Answer], ScriptedUpstream], gateway_server: Callable[..., Any]
) -> None:
    """Bodies on either side of the client's read buffer (aiohttp pauses reading past
    128 KiB), with a length or in many small chunks: each comes back whole, whether it had
    all arrived with its head or not, and the next request goes out on the same connection."""
    big = bytes(range(256)) * 1200  # 300 KiB
    script = [
        ok(b""),
        ok(b"x"),
        ok(big),
        chunked(*[big[i : i + 100] for i in range(0, 20_000, 100)]),
        chunked(big),
        ok(b"last"),
    ]
    expected = [b"", b"x", big, big[:20_000], big, b"last"]
    up = upstream(lambda seen: script[seen.index])
    gw = _gateway(gateway_server, up.url, client)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        got = [c.get("/v1/sentiment").content for _ in script]
    assert [len(body) for body in got] == [len(body) for body in expected]
    assert got == expected
    assert [s.connection for s in up.seen] == [0] * len(script)


@pytest.mark.parametrize("client", CLIENTS)
def test_a_body_that_stalls_after_the_head_is_cut_at_the_read_timeout(
    client: str,
    upstream: Callable[[Answer], ScriptedUpstream],
    gateway_server: Callable[..., Any],
    server_kind: str,
) -> None:
    """The head arrived, so the client has its status line; the rest of the body never does.
    The gateway resets the client's connection once the read timeout passes without more of it
    (it cannot change the status any more), and the next request gets a new connection."""

    def answer(seen: Seen) -> bytes:
        if seen.connection == 0:
            return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart"  # then nothing
        return ok(b"whole")

    up = upstream(answer)
    settings = {"upstream": {"client": client, "read_timeout_s": 0.3}}
    gw = gateway_server(flag_doc(up.url, None), settings=settings)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        with c.stream("GET", "/v1/sentiment") as r:
            assert r.status_code == 200
            # A reset; uvicorn's own protocol closes instead (docs/fast-path.md): either way a
            # failed transfer, never a clean short body.
            cut = httpx.ReadError if server_kind == "fast" else httpx.RemoteProtocolError
            with pytest.raises(cut):
                r.read()
        after = c.get("/v1/sentiment")
    assert (after.status_code, after.content) == (200, b"whole")
    assert [s.connection for s in up.seen] == [0, 1]


@pytest.mark.parametrize("client", CLIENTS)
def test_connection_close_from_the_upstream_is_honoured(
    client: str, upstream: Callable[[Answer], ScriptedUpstream], gateway_server: Callable[..., Any]
) -> None:
    def answer(seen: Seen) -> bytes | None:
        return None if seen.index > 0 else ok(b"once", b"Connection: close")

    up = upstream(answer)
    gw = _gateway(gateway_server, up.url, client)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for _ in range(3):
            r = c.post("/v1/sentiment", content=b"{}")
            assert (r.status_code, r.content) == (200, b"once")
            assert "connection" not in r.headers or r.headers["connection"] != "close"
    assert [s.connection for s in up.seen] == [0, 1, 2]


@pytest.mark.parametrize("client", ["aiohttp-direct", "httptools", "aiohttp"])
def test_a_pooled_connection_the_upstream_dropped_is_retried_for_get_but_not_for_post(
    client: str, upstream: Callable[[Answer], ScriptedUpstream], gateway_server: Callable[..., Any]
) -> None:
    """The race a keep-alive pool always has: the upstream closes an idle connection as the
    next request goes out on it. An idempotent request is sent again on a new connection,
    as aiohttp's ClientSession does (and the direct client after it); a POST is not (it may
    have been acted on). httpx sends every request once: see the next test."""
    up = upstream(lambda seen: ok(b"first") if seen.index == 0 else None)
    gw = _gateway(gateway_server, up.url, client)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        assert c.get("/v1/sentiment").content == b"first"  # connection 0, now pooled
        assert c.get("/v1/sentiment").content == b"first"  # 0 drops it; sent again on 1
        r = c.post("/v1/sentiment", content=b"{}")  # 1 drops it: not sent again
        assert r.status_code == 502
        assert r.json()["error"] == "connect_error"
    assert [(s.connection, s.index) for s in up.seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_with_httpx_a_pooled_connection_the_upstream_dropped_fails_the_request_once(
    upstream: Callable[[Answer], ScriptedUpstream], gateway_server: Callable[..., Any]
) -> None:
    """httpx (httpcore) sends no request twice, idempotent or not: the GET that meets the
    dropped connection is a 502 `connect_error`, and the next request gets a new connection."""
    up = upstream(lambda seen: ok(b"first") if seen.index == 0 else None)
    gw = _gateway(gateway_server, up.url, "httpx")
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        assert c.get("/v1/sentiment").content == b"first"  # connection 0, now pooled
        r = c.get("/v1/sentiment")  # 0 drops it: not sent again
        assert (r.status_code, r.json()["error"]) == (502, "connect_error")
        assert c.get("/v1/sentiment").content == b"first"  # connection 1
    assert [(s.connection, s.index) for s in up.seen] == [(0, 0), (0, 1), (1, 0)]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_body_framed_by_closing_the_connection_is_read_to_the_end(
    client: str, upstream: Callable[[Answer], ScriptedUpstream], gateway_server: Callable[..., Any]
) -> None:
    """No Content-Length, not chunked: the body is whatever comes before the upstream closes
    (RFC 9112 6.3, item 8)."""
    up = upstream(lambda seen: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nread until close")
    gw = _gateway(gateway_server, up.url, client)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for _ in range(2):
            r = c.get("/v1/sentiment")
            assert (r.status_code, r.content) == (200, b"read until close")


@pytest.mark.parametrize("client", CLIENTS)
def test_an_ipv6_upstream_is_reached_with_a_bracketed_host(
    client: str, upstream: Callable[..., ScriptedUpstream], gateway_server: Callable[..., Any]
) -> None:
    up = upstream(lambda seen: ok(b"six"), host="::1")
    gw = _gateway(gateway_server, up.url, client)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        r = c.post("/v1/sentiment/x?q=1", content=b"{}")
        assert (r.status_code, r.content) == (200, b"six")
        big = c.post("/v1/sentiment", content=b"x" * (2 * 1024 * 1024))  # streamed upstream
        assert (big.status_code, big.content) == (200, b"six")
    assert up.seen[0].request_line == b"POST /v1/sentiment/x?q=1 HTTP/1.1"
    assert up.seen[0].field(b"host") == up.url.removeprefix("http://").encode()
    assert len(up.seen[1].body) == 2 * 1024 * 1024


@pytest.mark.parametrize("client", CLIENTS)
def test_upstream_max_connections_bounds_the_pool_and_every_request_is_served(
    client: str, upstream: Callable[[Answer], ScriptedUpstream], gateway_server: Callable[..., Any]
) -> None:
    """`upstream.max_connections: 2` with 8 requests at once, each held 0.2 s by the upstream:
    at most 2 are at the upstream at any moment, on at most 2 connections, and every request
    waits its turn rather than fail."""
    lock = threading.Lock()
    at_upstream = [0, 0]  # now, most ever

    def slow(seen: Seen) -> bytes:
        with lock:
            at_upstream[0] += 1
            at_upstream[1] = max(at_upstream[1], at_upstream[0])
        time.sleep(0.2)
        with lock:
            at_upstream[0] -= 1
        return ok(b"%d" % seen.connection)

    up = upstream(slow)
    settings = {"upstream": {"client": client, "max_connections": 2}}
    gw = gateway_server(flag_doc(up.url, None), settings=settings)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda i: httpx.get(f"{gw.url}/v1/sentiment/{i}", timeout=30), range(8))
        )
    assert [r.status_code for r in answers] == [200] * 8
    assert len(up.seen) == 8
    assert at_upstream[1] <= 2, at_upstream
    assert len({s.connection for s in up.seen}) <= 2, up.seen


def test_request_writes_wait_for_the_end_of_the_loops_turn_and_skip_closed_connections() -> None:
    """Direct client only: `TurnWrites` is its mechanism (the stock clients write each
    request when it is ready). It holds the request writes of one turn of the event loop and
    sends them together when the turn ends: an upstream is then woken once for all of them
    rather than once for each, between which it would have gone back to sleep. A connection
    closed meanwhile gets nothing, and no error is raised for it."""

    async def main() -> tuple[list[bytes], list[bytes], bytes, bool]:
        loop = asyncio.get_running_loop()
        pairs = [socket.socketpair() for _ in range(3)]
        transports = []
        for ours, theirs in pairs:
            theirs.setblocking(False)
            transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
            transports.append(transport)
        writes = TurnWrites()
        writes.add(transports[0], b"first")
        writes.add(transports[1], b"second")
        writes.add(transports[2], b"never")
        transports[2].close()
        before = [_nonblocking_read(theirs) for _, theirs in pairs[:2]]
        for _ in range(3):
            await asyncio.sleep(0)
        after = [_nonblocking_read(theirs) for _, theirs in pairs[:2]]
        closed = _nonblocking_read(pairs[2][1])
        for transport in transports:
            transport.close()
        for _, theirs in pairs:
            theirs.close()
        return before, after, closed, writes.scheduled

    before, after, closed, still_scheduled = asyncio.run(main())
    assert before == [b"", b""]  # nothing on the wire while the turn goes on
    assert after == [b"first", b"second"]
    assert closed == b""  # the peer sees the close and no bytes
    assert not still_scheduled


def _nonblocking_read(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return b""
