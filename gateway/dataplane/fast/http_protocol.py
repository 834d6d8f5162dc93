"""The data plane's HTTP/1.1 protocol: uvicorn's httptools protocol with a few changes, and the
data port's connection limits (`limits:` in the settings, DESIGN 10).

This module reads and writes uvicorn's internals; it is imported only through the seam
(gateway/dataplane/servers.py), on the uvicorn versions it was tested on. docs/fast-path.md
tells how its pieces fit together.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from gateway.dataplane.deadlines import Deadlines
from gateway.dataplane.servers import ABORT_RESPONSE, CHUNK_WRITER, RESPOND_WHOLE

# Statuses whose responses carry no body, and the fields that frame one: such responses take
# uvicorn's general path.
_BODILESS = frozenset({*range(100, 200), 204, 304})
_FRAMING = frozenset({b"transfer-encoding", b"connection"})
# The bytes uvicorn's HEADER_RE and HEADER_VALUE_RE allow, for `bytes.translate`, which deletes
# them: what is left is what the regular expressions would find, in one pass of a C table
# lookup rather than the regular expression engine's test per byte.
NAME_BYTES = bytes(b for b in range(256) if not HEADER_RE.match(bytes([b])))
VALUE_BYTES = bytes(b for b in range(256) if not HEADER_VALUE_RE.match(bytes([b])))
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s
_HEAD_TIMEOUT_BODY = orjson.dumps(
    {"error": "head_timeout", "message": "the request head did not arrive in time"}
)
_HEAD_TIMEOUT = b"".join(
    [
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n",
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(_HEAD_TIMEOUT_BODY),
        _HEAD_TIMEOUT_BODY,
    ]
)


class CoalescingTransport(asyncio.Transport):
    """uvicorn writes a response's head and its body with two `transport.write` calls: two
    send() system calls and two TCP segments, and the client woken twice. This holds the
    writes made in one turn of the event loop and sends them together at the end of it, or
    when the protocol says so (`flush`).

    The rest of the transport's methods are passed on one by one rather than through
    `__getattr__`: with one, every attribute lookup on the object, its own included, would take
    CPython's slower path.
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

    @property
    def holding(self) -> bool:
        """Whether writes wait for the end of the turn (or `flush()`)."""
        return bool(self._pending)

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
    `http.response.body` (tests/integration/test_respond_whole_bytes.py compares them), with
    the checks it makes (header names and values are refused if they could split the head),
    from one pass over the headers, one search for bad bytes over all names and one over all
    values, and no message dicts. The Content-Length is the body's own; one in `headers` is
    dropped. Returns False, having
    written nothing, where uvicorn's general path is needed: a response already started, a
    HEAD request, a status without a body, framing fields, the client not reading (uvicorn
    waits for it to drain), bad bytes (uvicorn raises), or a `send` that is not the server's
    own (a middleware's). The app then sends the usual messages.

    The request is found from `send`, the bound method of its `RequestResponseCycle`, rather
    than bound into the extension: a reference to the cycle from its own scope would make a
    reference cycle of every request's scope, headers and cycle, left for the garbage
    collector.
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
    bad_in_names = b"".join(names).translate(None, NAME_BYTES)
    if bad_in_names or b"".join(values).translate(None, VALUE_BYTES):
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


def abort_response(send: Callable[..., Any]) -> bool:
    """Reset the connection of the request `send` belongs to, mid-response (a TCP RST, what
    was not yet sent dropped): the client sees a failed transfer, whatever it was told of the
    body's length. Returns False, doing nothing,
    where `send` is not uvicorn's httptools `send` (the caller then has the server close the
    connection another way). The request is over: uvicorn is told the client is gone, so it
    neither complains about an unfinished response nor reuses the connection."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle:
        return False
    cycle.keep_alive = False
    cycle.disconnected = True
    transport = cycle.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:  # a zero linger time makes the close a reset (RST), not a FIN
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    transport.abort()
    return True


class ChunkWriter:
    """Writes a chunked response body straight to the client's transport: one `write` per
    chunk with its framing, none of the checks, message dicts and awaits of uvicorn's `send`.

    It keeps the bookkeeping of uvicorn's `send` for the same messages: nothing is written to
    a client that has gone; the last chunk marks the response complete, wakes `receive()`,
    closes a connection that is not kept alive and lets the protocol go on with the next
    request. Flow control is uvicorn's: a write returns False while the transport's buffer is
    above its high-water mark, and `drain()` waits for it to go below, or for the client to
    go away.
    """

    __slots__ = ("_cycle", "_transport")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self._transport = cycle.transport

    def __call__(self, chunk: bytes) -> bool:
        cycle = self._cycle
        if cycle.disconnected:
            return True  # as uvicorn's `send`: nothing more to write to a client gone
        if chunk:  # an empty one would be the last chunk
            self._transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        return not cycle.flow.write_paused

    @property
    def holding(self) -> bool:
        transport = self._transport
        return type(transport) is CoalescingTransport and transport.holding

    async def drain(self) -> None:
        cycle = self._cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()  # uvicorn sets it again when the connection is lost

    def end(self) -> None:
        cycle = self._cycle
        if cycle.disconnected or cycle.response_complete:
            return
        self._transport.write(b"0\r\n\r\n")
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            self._transport.close()
        cycle.on_response()


def chunk_writer(send: Callable[..., Any]) -> ChunkWriter | None:
    """A `ChunkWriter` for the response `send` belongs to, once its head has gone out with a
    chunked body (uvicorn frames a body in chunks where the head names no length); None
    otherwise, or where `send` is not uvicorn's httptools `send` (a middleware's): the app then
    sends ASGI messages. As for `respond_whole`, the request is found from `send`, not bound
    into the extension, so that no request's scope refers to its own cycle."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle:
        return None
    if (
        not cycle.response_started
        or cycle.response_complete
        or not cycle.chunked_encoding
        or cycle.scope["method"] == "HEAD"
    ):
        return None
    return ChunkWriter(cycle)


# What every request's scope offers (`GatewayHttpProtocol`): one read-only mapping shared by
# all of them, rather than a dict of its own filled for each request.
_EXTENSIONS = MappingProxyType(
    {RESPOND_WHOLE: respond_whole, ABORT_RESPONSE: abort_response, CHUNK_WRITER: chunk_writer}
)


class ConnectionLimits:
    """What one server (one worker's data port) allows its connections.

    - A request head must be complete within `head_timeout_s` of the connection opening, or
      of the first bytes after an idle spell on a kept-alive connection; otherwise the
      connection is closed, with a 408 if part of a head arrived. One `Deadlines` timer per
      waiting connection: a dict store to start and a dict pop to stop, no loop timer of its
      own.
    - Beyond `max_connections` open connections, a new one is reset as soon as it is accepted.
    - Idle kept-alive connections close after uvicorn's `timeout_keep_alive` (set from
      `limits.keepalive_timeout_s`).
    Each closing is reported to `refused(reason)` (the `gateway_connections_refused_total`
    counter)."""

    __slots__ = ("head", "max_connections", "refused")

    def __init__(
        self, *, head_timeout_s: float, max_connections: int, refused: Callable[[str], object]
    ) -> None:
        self.max_connections = max_connections
        self.refused = refused
        self.head: Deadlines[GatewayHttpProtocol, None] = Deadlines(
            head_timeout_s, _head_timed_out, resolution_s=min(head_timeout_s / 10, 0.5)
        )

    def close(self) -> None:
        self.head.close()


def _head_timed_out(protocol: GatewayHttpProtocol, _: None) -> None:
    protocol.head_timers = None
    transport = protocol.transport
    if transport.is_closing():
        return
    limits = protocol.limits
    assert limits is not None
    if protocol.timeout_keep_alive_task is not None:
        return  # idle, no byte of a next head yet: the keep-alive timeout's to close
    cycle = protocol.cycle
    if cycle is not None and not cycle.response_complete:
        # A pipelined head waits behind a response still being sent: a 408 now would land in
        # the middle of that response. The head gets another period once it is its turn.
        protocol.head_timers = limits.head.start(protocol, None)
        return
    limits.refused("head_timeout")
    # uvicorn makes a scope when a message's first byte is parsed: part of a head is here.
    if protocol.scope is not None:
        transport.write(_HEAD_TIMEOUT)
    transport.close()


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with three changes.

    httptools hands chunked trailer fields to `on_header` too, and uvicorn appends them to
    the request's headers, where nothing can tell them apart: a client could smuggle a unit id
    or a rule's header past an edge that strips or signs them. Only the head's fields count:
    once it is complete, uvicorn is given a new list to append to (rather than overriding
    `on_header`, which would cost a call per field).

    Writes go through a `CoalescingTransport`: one send() per response instead of two. When a
    response is complete and no other request is in flight, it leaves at once rather than when
    its task next yields: after its last write the task still records metrics, feeds the guard
    and returns its upstream connection, which the client need not wait for. With other
    requests in flight the writes still wait for the end of the loop's turn: sent together,
    they wake the clients' side once instead of once each.

    Every request's scope offers `respond_whole` as the extension `RESPOND_WHOLE`,
    `abort_response` as `ABORT_RESPONSE` and `chunk_writer` as `CHUNK_WRITER`: the proxy answers
    most requests, whose upstream body is complete in memory, with one call instead of two ASGI
    messages through uvicorn's general `send`, resets the client's connection when an upstream
    fails mid-body, and relays an event stream chunk by chunk without a message per chunk.

    An HTTP/0.9 request line (no version), which llhttp parses, reaches the app like any
    request; the proxy answers it 400, whichever server runs (dataplane/proxy.py).

    With `limits` (`with_limits`), the connection limits above apply.
    """

    limits: ConnectionLimits | None = None
    # The head timer's slice while this connection waits for a request head (see
    # `ConnectionLimits`); a class default, so only connections that wait set their own.
    head_timers: dict[GatewayHttpProtocol, None] | None = None

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type[GatewayHttpProtocol]:
        """This protocol, for a server whose connections `limits` governs."""
        return type("LimitedGatewayHttpProtocol", (cls,), {"limits": limits})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CoalescingTransport(self.transport, self.loop)
        limits = self.limits
        if limits is not None:
            if len(self.connections) > limits.max_connections:
                limits.refused("max_connections")
                self.transport.abort()
                return
            self.head_timers = limits.head.start(self, None)

    def connection_lost(self, exc: Exception | None) -> None:
        timers = self.head_timers
        if timers is not None:
            self.head_timers = None
            timers.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's, plus the head timer of a kept-alive connection: bytes after an idle spell
        # that do not complete a head start the next head's clock. A head that arrives whole
        # in one read, as nearly every one does, costs no timer at all.
        idle = self.timeout_keep_alive_task
        cycle = self.cycle
        if idle is not None:
            idle.cancel()
            self.timeout_keep_alive_task = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if idle is not None and self.cycle is cycle:  # no head completed in this read
            limits = self.limits
            if limits is not None and self.head_timers is None and not self.transport.is_closing():
                self.head_timers = limits.head.start(self, None)

    def timeout_keep_alive_handler(self) -> None:
        limits = self.limits
        if limits is not None and not self.transport.is_closing():
            limits.refused("keepalive_timeout")
        super().timeout_keep_alive_handler()

    def on_headers_complete(self) -> None:
        timers = self.head_timers
        if timers is not None:
            self.head_timers = None
            timers.pop(self, None)
        super().on_headers_complete()
        cycle = self.cycle
        # An upgrade request returns early, before a cycle for it exists.
        if cycle is not None and cycle.scope is self.scope:
            scope: dict[str, Any] = self.scope  # type: ignore[assignment]
            theirs = scope.get("extensions")
            scope["extensions"] = _EXTENSIONS if theirs is None else {**theirs, **_EXTENSIONS}
            # Trailer fields arrive through `on_header` too: they go to a list nobody reads,
            # not to the one in the scope (the next message starts a new one).
            self.headers = []

    def on_response_complete(self) -> None:
        if len(self.tasks) <= 1:  # this response's task is the only one in flight
            self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()
