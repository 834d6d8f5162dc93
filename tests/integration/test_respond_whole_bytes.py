"""`respond_whole` (the fast protocol's one-call answer) writes the bytes uvicorn's own `send()`
writes for the same response: status line, header fields, the Content-Length, `connection:
close` where the connection ends, and the body, for HTTP/1.1 and HTTP/1.0 clients, kept alive,
closed and pipelined.

Two real uvicorn servers on loopback: one with the gateway's protocol answering through
`RESPOND_WHOLE`, one with uvicorn's own httptools protocol answering with the two ASGI
messages. Raw sockets send the same bytes to both and read everything back.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from conftest import UvicornHandle

from gateway.dataplane.fast.http_protocol import GatewayHttpProtocol
from gateway.dataplane.servers import RESPOND_WHOLE

Headers = list[tuple[bytes, bytes]]

# name -> (status, header fields as the app gives them, body)
RESPONSES: dict[str, tuple[int, Headers, bytes]] = {
    "json": (200, [(b"content-type", b"application/json")], b'{"score": 0.5}'),
    "empty": (200, [], b""),
    "created": (201, [(b"Location", b"/v1/x/1"), (b"X-Request-Id", b"abc-1")], b"made"),
    "not-found": (
        404,
        [(b"content-type", b"application/json"), (b"x-gateway-variant", b"v2")],
        b'{"error": "no_route"}',
    ),
    "cookies": (
        200,
        [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; HttpOnly"), (b"vary", b"x")],
        b"two cookies",
    ),
    "obs-text": (200, [(b"x-name", "caf\u00e9".encode("latin-1"))], b"latin-1 bytes"),
    "stale-length": (200, [(b"content-length", b"999"), (b"x-a", b"1")], b"own length"),
    "server-error": (500, [(b"content-type", b"text/plain")], b"upstream failed"),
    "teapot": (418, [], b"short and stout"),
    "unnamed-status": (299, [], b"no reason phrase in the table"),
    "large": (200, [(b"content-type", b"application/octet-stream")], bytes(range(256)) * 1024),
}


def _stock_headers(headers: Headers, body: bytes) -> Headers:
    """What an app gives uvicorn's `send` for the same response: the body's own length, last
    (where `respond_whole` writes it)."""
    kept = [(name, value) for name, value in headers if name.lower() != b"content-length"]
    return [*kept, (b"content-length", b"%d" % len(body))]


def _name(scope: dict[str, Any]) -> str:
    return str(scope["path"]).rsplit("/", 1)[1]


@pytest.fixture
def servers(
    uvicorn_app: Callable[..., UvicornHandle],
) -> tuple[UvicornHandle, UvicornHandle, list[bool]]:
    """(fast, stock, what `respond_whole` returned for each request the fast one served)."""
    answered: list[bool] = []

    async def whole(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        status, headers, body = RESPONSES[_name(scope)]
        answered.append(scope["extensions"][RESPOND_WHOLE](send, status, list(headers), body))

    async def messages(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        status, headers, body = RESPONSES[_name(scope)]
        head = _stock_headers(headers, body)
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})

    options: dict[str, Any] = {"lifespan": "off", "date_header": False}
    fast = uvicorn_app(whole, http=GatewayHttpProtocol, **options)
    stock = uvicorn_app(messages, http="httptools", **options)
    return fast, stock, answered


def _conversation(port: int, requests: bytes, answers: int, *, closes: bool) -> bytes:
    """Send `requests` at once; read `answers` whole responses (framed by Content-Length),
    then, where the server is to close, everything up to its close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(requests)
        received = b""
        while _complete(received) < answers:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {_complete(received)} of {answers}: {received[:300]!r}"
            received += chunk
        if closes:
            while chunk := sock.recv(65536):
                received += chunk
        return received


def _complete(data: bytes) -> int:
    """How many whole responses `data` starts with."""
    count = 0
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return count
        fields = [line.partition(b":") for line in head.split(b"\r\n")[1:]]
        length = int(next(v for n, _, v in fields if n.lower() == b"content-length"))
        if len(rest) < length:
            return count
        count += 1
        data = rest[length:]


# (name, request bytes for one response name, how many answers, whether the server closes)
CONVERSATIONS: list[tuple[str, Callable[[str], bytes], int, bool]] = [
    (
        "http/1.1 kept alive",
        lambda n: b"GET /r/%s HTTP/1.1\r\nhost: gw\r\n\r\n" % n.encode(),
        1,
        False,
    ),
    (
        "http/1.1 connection: close",
        lambda n: b"GET /r/%s HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n" % n.encode(),
        1,
        True,
    ),
    ("http/1.0", lambda n: b"GET /r/%s HTTP/1.0\r\n\r\n" % n.encode(), 1, True),
    (  # uvicorn keeps no HTTP/1.0 connection alive, asked or not
        "http/1.0 keep-alive",
        lambda n: b"GET /r/%s HTTP/1.0\r\nconnection: keep-alive\r\n\r\n" % n.encode(),
        1,
        True,
    ),
    (
        "pipelined, the second closes",
        lambda n: (
            b"GET /r/%s HTTP/1.1\r\nhost: gw\r\n\r\n"
            % n.encode()
            + b"POST /r/%s HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\nconnection: close\r\n"
            b"\r\nhi" % n.encode()
        ),
        2,
        True,
    ),
]


@pytest.mark.parametrize("name", list(RESPONSES))
def test_respond_whole_writes_the_bytes_uvicorns_send_writes(
    servers: tuple[UvicornHandle, UvicornHandle, list[bool]], name: str
) -> None:
    fast, stock, answered = servers
    for what, request_of, answers, closes in CONVERSATIONS:
        request = request_of(name)
        ours = _conversation(fast.port, request, answers, closes=closes)
        theirs = _conversation(stock.port, request, answers, closes=closes)
        assert ours == theirs, what
        assert (b"\r\nconnection: close\r\n" in ours) == closes, (what, ours[:300])
    # Every answer went through `respond_whole`, never uvicorn's general path.
    assert answered == [True] * sum(answers for _, _, answers, _ in CONVERSATIONS)
