"""The data plane's HTTP protocol (dataplane/fast/http_protocol.py) on a real uvicorn, over
loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import UvicornHandle, raw_http
from hypothesis import given
from hypothesis import strategies as st
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE
from waiting import wait_until

from gateway.dataplane.fast.http_protocol import (
    NAME_BYTES,
    RESPOND_WHOLE,
    VALUE_BYTES,
    CoalescingTransport,
    GatewayHttpProtocol,
)
from gateway.dataplane.servers import CHUNK_WRITER


def test_a_complete_response_leaves_before_the_task_goes_on(
    uvicorn_app: Callable[..., UvicornHandle],
) -> None:
    """The writes of a response are held to be sent together, but when it is the one request
    in flight not past its last write: what the request's task does afterwards (metrics, the
    guard, returning its upstream connection) must not delay the client. The app below blocks
    its event loop after its last write until the client has the answer, so the answer must
    already be on the wire."""
    client_has_it, app_done = threading.Event(), threading.Event()
    in_time: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        head = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": b"ok"})
        in_time.append(client_has_it.wait(timeout=5))
        app_done.set()

    handle = uvicorn_app(app, http=GatewayHttpProtocol, lifespan="off")
    answers: list[tuple[int, bytes]] = []

    def client() -> None:
        answers.append(raw_http(handle.port, b"GET / HTTP/1.1\r\nhost: gw\r\n\r\n"))
        client_has_it.set()

    thread = threading.Thread(target=client)
    thread.start()
    thread.join(timeout=15)
    assert app_done.wait(timeout=15)
    assert answers == [(200, b"ok")]
    assert in_time == [True]


def test_with_other_requests_in_flight_a_response_waits_for_the_turns_end(
    uvicorn_app: Callable[..., UvicornHandle],
) -> None:
    """Under load the writes of one turn of the loop go out together (one wake-up of the
    clients' side instead of one each): a complete response then waits until its task yields,
    here until the app stops blocking the loop."""
    client_has_it, second_started, release = threading.Event(), threading.Event(), asyncio.Event()
    in_time: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if scope["path"] == "/slow":
            second_started.set()
            await release.wait()  # in flight while /fast answers
        head = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": b"ok"})
        if scope["path"] == "/fast":
            in_time.append(client_has_it.wait(timeout=1))
            release.set()

    handle = uvicorn_app(app, http=GatewayHttpProtocol, lifespan="off")
    answers: list[tuple[int, bytes]] = []
    slow = threading.Thread(
        target=lambda: answers.append(
            raw_http(handle.port, b"GET /slow HTTP/1.1\r\nhost: gw\r\n\r\n")
        )
    )
    slow.start()
    assert second_started.wait(timeout=10)
    answers.append(raw_http(handle.port, b"GET /fast HTTP/1.1\r\nhost: gw\r\n\r\n"))
    client_has_it.set()
    slow.join(timeout=15)
    assert answers == [(200, b"ok"), (200, b"ok")]
    assert in_time == [False]  # the fast answer left only after the app let go of the loop


def test_head_and_body_written_in_separate_turns_both_arrive(
    uvicorn_app: Callable[..., UvicornHandle],
) -> None:
    """A streamed response: the head is held until the loop turns, later chunks follow."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one,", b"two,", b"three"):
            await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    handle = uvicorn_app(app, http=GatewayHttpProtocol, lifespan="off")
    status, body = raw_http(handle.port, b"GET / HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
    assert status == 200
    assert body == b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"


# --- the chunk writer: a chunked body straight to the connection -------------------------------

PARTS = (b"data: one\n\n", b"data: two\n\n", b"data: three\n\n")


async def _chunked_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with PARTS, through the chunk writer on /writer and uvicorn's `send` elsewhere."""
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    write = scope["extensions"][CHUNK_WRITER](send) if scope["path"] == "/writer" else None
    for part in PARTS:
        await asyncio.sleep(0.01)  # each part in a turn of its own
        if write is None:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        elif not write(part) or not write(b""):  # an empty chunk writes nothing
            await write.drain()
    if write is None:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        write.end()


def test_the_chunk_writer_writes_what_uvicorns_send_writes_and_keeps_the_connection(
    uvicorn_app: Callable[..., UvicornHandle],
) -> None:
    handle = uvicorn_app(_chunked_app, http=GatewayHttpProtocol, lifespan="off", date_header=False)
    by_send, by_writer = (
        _exchange(handle.port, *[b"GET /%s HTTP/1.1\r\nhost: gw\r\n\r\n" % path] * 2)
        for path in (b"send", b"writer")
    )
    assert by_writer == by_send  # two answers each: the connection was kept alive for the next
    assert by_writer.count(b"HTTP/1.1 200 OK") == 2
    assert by_writer.count(b"transfer-encoding: chunked\r\n\r\nb\r\ndata: one\n\n\r\n") == 2
    assert by_writer.endswith(b"d\r\ndata: three\n\n\r\n0\r\n\r\n")
    closing = b"GET /writer HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n"
    received = _exchange(handle.port, closing, closing)
    assert received.count(b"HTTP/1.1 200 OK") == 1 and received.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("before-head", "no head has gone out yet"),
        ("length", "a body with a Content-Length is not chunked"),
        ("head", "a HEAD response has no body"),
        ("wrapped", "only the server's own send tells which request it is"),
        ("complete", "the response is over"),
    ],
)
def test_the_chunk_writer_is_declined_where_the_body_is_not_chunks_to_come(
    uvicorn_app: Callable[..., UvicornHandle], case: str, why: str
) -> None:
    offered: list[object] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        writer_for = scope["extensions"][CHUNK_WRITER]
        if case == "before-head":
            offered.append(writer_for(send))
        head = [(b"content-length", b"2")] if case == "length" else []
        await send({"type": "http.response.start", "status": 200, "headers": head})
        if case in ("length", "head", "wrapped"):
            offered.append(writer_for(send if case != "wrapped" else lambda m: send(m)))
        await send({"type": "http.response.body", "body": b"ok"})
        if case == "complete":
            offered.append(writer_for(send))

    handle = uvicorn_app(app, http=GatewayHttpProtocol, lifespan="off")
    method = b"HEAD" if case == "head" else b"GET"
    received = _exchange(handle.port, method + b" / HTTP/1.1\r\nhost: gw\r\n\r\n")
    assert offered == [None], why
    assert received.startswith(b"HTTP/1.1 200 OK")


def test_the_chunk_writer_says_when_the_client_is_not_reading_and_loses_nothing(
    uvicorn_app: Callable[..., UvicornHandle],
) -> None:
    part = b"x" * 65536
    written: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        write = scope["extensions"][CHUNK_WRITER](send)
        while len(written) < 1000 and (written[-1] if written else True):
            written.append(write(part))  # until the client's buffer is full
            await asyncio.sleep(0)
        await write.drain()  # returns once the client reads again
        write(b"end")
        write.end()

    handle = uvicorn_app(app, http=GatewayHttpProtocol, lifespan="off")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", handle.port))
        sock.sendall(b"GET / HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
        wait_until(lambda: written and not written[-1], "the writer to say the client is full")
        sock.settimeout(30)
        received = b"".join(iter(lambda: sock.recv(65536), b""))
    assert len(written) < 1000  # far fewer than the app would have written unchecked
    body = received.partition(b"\r\n\r\n")[2]
    assert body.count(b"10000\r\n" + part + b"\r\n") == len(written)
    assert body.endswith(b"3\r\nend\r\n0\r\n\r\n")


# --- respond_whole: a whole response in one call ------------------------------------------------

WHOLE_CASES: dict[str, tuple[int, list[tuple[bytes, bytes]], bytes]] = {
    "/plain": (200, [(b"Content-Type", b"application/json"), (b"content-length", b"999")], b"{}"),
    "/no-content": (204, [], b""),
    "/framed": (200, [(b"transfer-encoding", b"chunked")], b"x"),
    "/connection": (200, [(b"connection", b"keep-alive")], b"x"),
    "/bad-value": (200, [(b"x-a", b"1\r\nset-cookie: stolen=1")], b"x"),
    "/bad-name": (200, [(b"x a", b"1")], b"x"),
    "/wrapped": (200, [], b"x"),  # the app passes a wrapper of its `send`, as a middleware would
}


@pytest.fixture
def whole_server(uvicorn_app: Callable[..., UvicornHandle]) -> tuple[UvicornHandle, list[bool]]:
    """An app that answers through `RESPOND_WHOLE` with the case its path names, and with
    uvicorn's usual messages (`fallback` in the body) when the extension declines."""
    answered: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        status, headers, body = WHOLE_CASES[scope["path"]]
        respond = scope["extensions"][RESPOND_WHOLE]
        own = send if scope["path"] != "/wrapped" else lambda message: send(message)
        done = respond(own, status, headers, body)
        answered.append(done)
        if not done:
            head = [(b"content-length", b"8")] if status != 204 else []
            await send({"type": "http.response.start", "status": status, "headers": head})
            await send({"type": "http.response.body", "body": b"fallback" if head else b""})

    served = uvicorn_app(app, http=GatewayHttpProtocol, lifespan="off", date_header=False)
    return served, answered


def _exchange(port: int, *requests: bytes) -> bytes:
    """Send the requests one after another on one connection; all that came back until the
    server closed it or went quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        received = b""
        for request in requests:
            sock.sendall(request)
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                while chunk := sock.recv(65536):
                    received += chunk
        return received


def test_whole_response_is_one_head_with_the_bodys_own_length(
    whole_server: tuple[UvicornHandle, list[bool]],
) -> None:
    handle, answered = whole_server
    get = b"GET /plain HTTP/1.1\r\nhost: gw\r\n\r\n"
    received = _exchange(handle.port, get, get)  # kept alive: both answered on one connection
    one = (
        b"HTTP/1.1 200 OK\r\nserver: uvicorn\r\n"  # the server's own fields first, as uvicorn
        b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    )
    assert received == one + one
    assert answered == [True, True]


def test_whole_response_closes_when_the_client_asked_to(
    whole_server: tuple[UvicornHandle, list[bool]],
) -> None:
    handle, answered = whole_server
    received = _exchange(
        handle.port, b"GET /plain HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n"
    )
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"connection: close" in head.split(b"\r\n")
    assert body == b"{}"
    assert answered == [True]
    received = _exchange(
        handle.port, b"GET /plain HTTP/1.0\r\n\r\n", b"GET /plain HTTP/1.0\r\n\r\n"
    )
    assert received.count(b"HTTP/1.1 200 OK") == 1  # the server closed after the first


@pytest.mark.parametrize(
    ("request_line", "why"),
    [
        (b"HEAD /plain HTTP/1.1", "a HEAD response has no body but the length of one"),
        (b"GET /no-content HTTP/1.1", "204 carries no body and no length"),
        (b"GET /framed HTTP/1.1", "framing fields are uvicorn's to write"),
        (b"GET /connection HTTP/1.1", "a Connection field may close the connection"),
        (b"GET /wrapped HTTP/1.1", "only the server's own send tells which request it is"),
    ],
)
def test_whole_response_declines_what_needs_the_general_path(
    whole_server: tuple[UvicornHandle, list[bool]], request_line: bytes, why: str
) -> None:
    handle, answered = whole_server
    received = _exchange(handle.port, request_line + b"\r\nhost: gw\r\n\r\n")
    assert answered == [False], why
    assert received.startswith(b"HTTP/1.1 ")


@pytest.mark.parametrize("path", [b"/bad-value", b"/bad-name"])
def test_whole_response_never_writes_a_head_that_could_be_split(
    whole_server: tuple[UvicornHandle, list[bool]], path: bytes
) -> None:
    """Bytes uvicorn refuses are refused here too: declined, and uvicorn's own send then
    refuses them (a 500 for the app's error, never the injected field)."""
    handle, answered = whole_server
    received = _exchange(handle.port, b"GET " + path + b" HTTP/1.1\r\nhost: gw\r\n\r\n")
    assert answered == [False]
    assert b"stolen" not in received


@given(st.binary(max_size=64))
def test_the_bad_byte_tables_find_what_uvicorns_expressions_find(data: bytes) -> None:
    assert bool(data.translate(None, NAME_BYTES)) == bool(HEADER_RE.search(data))
    assert bool(data.translate(None, VALUE_BYTES)) == bool(HEADER_VALUE_RE.search(data))


def test_the_coalescing_transport_answers_every_transport_method_itself() -> None:
    """uvicorn may call any of asyncio.Transport's methods. Each must be the coalescing
    transport's own (flushing first where order matters), not the base class's stub that
    raises NotImplementedError, and not a lookup through `__getattr__`, which slows every
    attribute access on the object."""
    methods = {
        name
        for klass in asyncio.Transport.__mro__
        for name, value in vars(klass).items()
        if callable(value) and not name.startswith("_")
    }
    missing = sorted(name for name in methods if name not in vars(CoalescingTransport))
    assert missing == []
    assert "__getattr__" not in vars(CoalescingTransport)


def test_the_coalescing_transport_counts_held_writes_and_drops_them_on_abort() -> None:
    async def main() -> tuple[list[bytes], int, list[bytes]]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
            held = CoalescingTransport(transport, loop)  # type: ignore[arg-type]
            held.write(b"head")
            held.write(bytearray(b"body"))
            size = held.get_write_buffer_size()
            held.flush()
            await asyncio.sleep(0.01)
            theirs.setblocking(False)
            sent = [theirs.recv(100)]
            held.write(b"never sent")
            held.abort()
            await asyncio.sleep(0.01)
            after = [theirs.recv(100)]  # b"": aborted, and nothing held went out
            return sent, size, after

    sent, size, after = asyncio.run(main())
    assert (sent, size, after) == ([b"headbody"], 8, [b""])


def test_keep_alive_closes_an_idle_connection_and_each_request_restarts_its_wait(
    uvicorn_app: Callable[..., UvicornHandle],
) -> None:
    """`on_response_complete` is overridden here, and uvicorn arms its keep-alive timer in
    it: a connection left idle for `timeout_keep_alive` is closed, not before, and a request
    arriving in time stops the timer, so three requests half the timeout apart all get their
    answer on one connection."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        head = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": b"ok"})

    keep_alive_s = 2
    handle = uvicorn_app(app, http=GatewayHttpProtocol, lifespan="off", timeout_keep_alive=2)
    answers = []
    with socket.create_connection(("127.0.0.1", handle.port), timeout=10) as sock:
        for _ in range(3):
            sock.sendall(b"GET / HTTP/1.1\r\nhost: gw\r\n\r\n")
            answer = b""
            while not answer.endswith(b"ok"):
                chunk = sock.recv(4096)
                assert chunk, "the connection closed while a request was answered"
                answer += chunk
            answers.append(answer.split(b"\r\n", 1)[0])
            idle_from = time.monotonic()
            time.sleep(keep_alive_s / 2)
        rest = sock.recv(4096)  # the server closes the connection: b""
        idle_for = time.monotonic() - idle_from
    assert answers == [b"HTTP/1.1 200 OK"] * 3
    assert rest == b""
    assert idle_for >= keep_alive_s - 0.1  # measured from the client: the answer took time
