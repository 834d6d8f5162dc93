"""What the clients that write HTTP/1.1 themselves put on the wire, on asyncio's public API
only: the request head, and the writes held to the end of the event loop's turn.

The direct aiohttp client (gateway/dataplane/fast/aiohttp_client.py) and the httptools
client (`upstream/httptools_client.py`) both use them.
"""

from __future__ import annotations

import asyncio

from gateway.errors import UnsendableRequest

# Methods that may be sent again when a pooled connection turns out to be closed before any
# answer (RFC 9110 9.2.2), as aiohttp's ClientSession does.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# aiohttp sends `Content-Length: 0` for a bodiless request of any other method; so do we.
NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# `body_length` for a body sent in chunks as it arrives.
CHUNKED = -1
# A pooled connection idle longer than this is closed rather than used: upstreams close idle
# connections after a few seconds, and one that did so just now would cost a retry (aiohttp's
# keep-alive default).
IDLE_LIMIT_S = 15.0


def request_head(
    method: str,
    host: str,
    path_prefix: str,
    target: str,
    headers: list[tuple[str, str]],
    body_length: int,
) -> bytes:
    """The request line, Host, `headers` and the body's framing, as bytes.

    `body_length` is the length of a body sent whole (0 for none) or CHUNKED. Each header
    string is the latin-1 reading of the bytes that arrived, so encoding it back writes
    those bytes unchanged, obs-text included.
    """
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers])
    # The names and values come from a request httptools parsed, or from the gateway itself;
    # a line break in one would split the head, so it is refused rather than trusted.
    if fields.count("\n") != len(headers) or fields.count("\r") != len(headers):
        raise UnsendableRequest("a forwarded header contains a line break")
    if body_length > 0:
        framing = f"Content-Length: {body_length}\r\n"
    elif body_length == CHUNKED:
        framing = "Transfer-Encoding: chunked\r\n"
    else:
        framing = "" if method in NO_BODY_METHODS else "Content-Length: 0\r\n"
    start = f"{method} {path_prefix}{target} HTTP/1.1\r\nHost: {host}\r\n"
    try:
        return f"{start}{fields}{framing}\r\n".encode("latin-1")
    except UnicodeEncodeError as exc:  # only the gateway's own strings could hold such text
        raise UnsendableRequest("a header holds text that is not a byte string") from exc


class TurnWrites:
    """Request writes held until the end of the event loop's turn, then sent one after
    another; a connection closed meanwhile gets nothing (its exchange fails as on any closed
    connection)."""

    __slots__ = ("_pending", "_scheduled")

    def __init__(self) -> None:
        self._pending: list[tuple[asyncio.Transport, bytes]] = []
        self._scheduled = False

    @property
    def scheduled(self) -> bool:
        """Whether a flush waits for the end of this turn."""
        return self._scheduled

    def add(self, transport: asyncio.Transport, data: bytes) -> None:
        self._pending.append((transport, data))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for transport, data in pending:
            if not transport.is_closing():
                transport.write(data)
