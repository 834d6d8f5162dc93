"""The data plane's HTTP/1.1 protocol: uvicorn's httptools protocol with three changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

# The scope extension (ASGI `scope["extensions"]`) through which an app answers with a whole
# response in one call: `respond(send, status, headers, body) -> bool`, where `send` is the
# one the server gave the app with that scope; see `respond_whole`.
RESPOND_WHOLE = "gateway.respond_whole"

# Statuses whose responses carry no body, and the fields that frame one: such responses take
# uvicorn's general path.
_BODILESS = frozenset({*range(100, 200), 204, 304})
_FRAMING = frozenset({b"transfer-encoding", b"connection"})
# The bytes uvicorn's HEADER_RE and HEADER_VALUE_RE allow, for `bytes.translate`, which deletes
# them: what is left is what the regular expressions would find. One pass in a C table lookup
# instead of the regular expression engine's character-class test per byte.
_NAME_BYTES = bytes(b for b in range(256) if not HEADER_RE.match(bytes([b])))
_VALUE_BYTES = bytes(b for b in range(256) if not HEADER_VALUE_RE.match(bytes([b])))


class _CoalescingTransport(asyncio.Transport):
    """uvicorn writes a response's head and its body with two `transport.write` calls: two
    send() system calls and two TCP segments, and the client woken twice. This holds the
    writes made in one turn of the event loop and sends them together at the end of it, or
    when the protocol says so (`flush`).

    The rest of the transport's methods are passed on one by one rather than through
    `__getattr__`: with one, every attribute lookup on the object, its own included, takes
    CPython's slower path (~13 per request, ~4,000 instructions in all).
    """

    __slots__ = ("_flush_scheduled", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._flush_scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending.append(bytes(data) if not isinstance(data, bytes) else data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        self._flush_scheduled = False
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self._pending)) + self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


def respond_whole(
    send: Callable[..., Any], status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> bool:
    """Answer the request `send` belongs to with a whole response: head and complete body in
    one write.

    The same bytes uvicorn's `send` would write for `http.response.start` and one final
    `http.response.body`, with the checks it makes (header names and values are refused if
    they could split the head), from one pass over the headers, one search for bad bytes over
    all names and one over all values, and no message dicts: 17,000 fewer instructions per
    request than the two messages (callgrind, bench/RESULTS.md). The
    Content-Length is the body's own; one in `headers` is dropped. Returns False, having
    written nothing, where uvicorn's general path is needed: a response already started, a
    HEAD request, a status without a body, framing fields, the client not reading (uvicorn
    waits for it to drain), bad bytes (uvicorn raises), or a `send` that is not the server's
    own (a middleware's). The app then sends the usual messages.

    The request is found from `send`, the bound method of its `RequestResponseCycle`, rather
    than bound into the extension: a reference to the cycle from its own scope would make a
    reference cycle of every request's scope, headers and cycle, left for the garbage
    collector (11 objects a request, 3 % of the process's time under load).
    """
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle:
        return False
    scope = cycle.scope
    if (
        cycle.response_started
        or cycle.flow.write_paused
        or status in _BODILESS
        or scope["method"] == "HEAD"
    ):
        return False
    if cycle.disconnected:
        return True  # as uvicorn's send: nothing to answer
    content = [STATUS_LINE[status]]
    names, values = [], []
    for name, value in (*cycle.default_headers, *headers):
        name = name.lower()
        if name == b"content-length":
            continue
        if name in _FRAMING:
            return False
        names.append(name)
        values.append(value)
        content += (name, b": ", value, b"\r\n")
    bad_in_names = b"".join(names).translate(None, _NAME_BYTES)
    if bad_in_names or b"".join(values).translate(None, _VALUE_BYTES):
        return False
    content.append(b"content-length: %d\r\n" % len(body))
    if not cycle.keep_alive:
        content.append(b"connection: close\r\n")
    content += (b"\r\n", body)
    if cycle.access_log:
        cycle.access_logger.info(
            '%s - "%s %s HTTP/%s" %d',
            get_client_addr(scope),
            scope["method"],
            get_path_with_query_string(scope),
            scope["http_version"],
            status,
        )
    cycle.response_started = cycle.response_complete = True
    cycle.waiting_for_100_continue = False
    transport = cycle.transport
    transport.write(b"".join(content))
    cycle.message_event.set()
    if not cycle.keep_alive:
        transport.close()
    cycle.on_response()
    return True


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with three changes.

    httptools hands chunked trailer fields to `on_header` too, and uvicorn appends them to
    the request's headers, where nothing can tell them apart: a client could smuggle a unit id
    or a rule's header past an edge that strips or signs them. Only the head's fields count:
    once it is complete, uvicorn is given a new list to append to. (Overriding `on_header` to
    drop them instead cost a call and a `super()` per field: ~4,000 instructions a request,
    1 %, bench/RESULTS.md.)

    Writes go through a `_CoalescingTransport`: one send() per response instead of two
    (~30 us of CPU per proxied request here, bench/RESULTS.md). When a response is complete
    and no other request is in flight, it leaves at once rather than when its task next
    yields: after its last write the task still records metrics, feeds the guard and returns
    its upstream connection, ~70 us at 100 req/s that the client need not wait for. With
    other requests in flight the writes still wait for the end of the loop's turn: sent
    together, they wake the clients' side once instead of once each, and sending each at
    once cost 16-18 us more of kernel time per request under wrk (bench/RESULTS.md).

    Every request's scope offers `respond_whole` as the extension `RESPOND_WHOLE`: the proxy
    answers most requests, whose upstream body is complete in memory, with one call instead
    of two ASGI messages through uvicorn's general `send`.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _CoalescingTransport(self.transport, self.loop)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # An upgrade request returns early, before a cycle for it exists.
        if cycle is not None and cycle.scope is self.scope:
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[RESPOND_WHOLE] = respond_whole
            # Trailer fields arrive through `on_header` too: they go to a list nobody reads,
            # not to the one in the scope (the next message starts a new one).
            self.headers = []

    def on_response_complete(self) -> None:
        if len(self.tasks) <= 1:  # this response's task is the only one in flight
            self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()
