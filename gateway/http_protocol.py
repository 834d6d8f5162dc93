"""The data plane's HTTP/1.1 protocol: uvicorn's httptools protocol with two changes."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _CoalescingTransport:
    """uvicorn writes a response's head and its body with two `transport.write` calls: two
    send() system calls and two TCP segments, and the client woken twice. This holds the
    writes made in one turn of the event loop and sends them together at the end of it, or
    as soon as the response is complete (`flush`)."""

    __slots__ = ("_flush_scheduled", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._flush_scheduled = False

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with two changes.

    httptools hands chunked trailer fields to `on_header` too, and uvicorn appends them to
    the request's headers, where nothing can tell them apart: a client could smuggle a unit id
    or a rule's header past an edge that strips or signs them. Only the head's fields count.

    Writes go through a `_CoalescingTransport`: one send() per response instead of two
    (~30 us of CPU per proxied request here, bench/RESULTS.md). They leave the moment the
    response is complete, not when the request's task next yields: after its last body write
    the task still records metrics, feeds the guard and returns its upstream connection, and
    the client need not wait for that.
    """

    _in_head = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _CoalescingTransport(self.transport, self.loop)  # type: ignore[assignment]

    def on_message_begin(self) -> None:
        self._in_head = True
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()
