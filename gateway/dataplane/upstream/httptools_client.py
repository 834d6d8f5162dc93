"""The httptools upstream client (`upstream.client: httptools`): HTTP/1.1 on asyncio's public
transport API, answers read by httptools' public parser (llhttp, as uvicorn reads requests).

It touches no library's internals, so no release of aiohttp or uvicorn can break it. It is the
default client, and what runs when the direct aiohttp client cannot be loaded
(`upstream/choice.py`). It keeps the
promises every upstream client keeps (DESIGN 10):

- failures are the gateway's errors: `UpstreamConnectError` (refused, reset, closed before an
  answer), `UpstreamTimeout` (no connection within the connect timeout; no head, or no more of
  the body, within the read timeout), `UpstreamBadResponse` (not HTTP, or a body that breaks
  its own framing: short, or a bad chunk), from `send()` before the head and from `chunks()`
  after it;
- the request goes out with the client's own headers, as the bytes that arrived (obs-text
  included), plus Host and the body's framing; nothing is invented, and bodies are relayed
  undecoded;
- a streamed request body goes out in chunks; if it ends early (over `max_body_bytes`, or its
  client gone) the connection is dropped without the last chunk, so the upstream never sees a
  complete-looking request;
- an idempotent request (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) sent on a pooled connection
  that the upstream closes before a byte of answer is sent once more on a new connection; a
  POST is not (RFC 9112 9.3.1, as aiohttp's ClientSession does).

A connection serves one exchange at a time and goes back to its origin's pool once an answer
has been read to its end on a connection both sides keep alive. An unread answer stops the
connection being read once `BUFFER_LIMIT` bytes of it wait (TCP's flow control then holds
the upstream back) until the reader takes them. A body can also be pushed (`push_chunks`):
each piece goes from the parser's callback to the consumer's, and a consumer that is full
stops the reading until it drains.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import cast

import httptools

from gateway.dataplane.deadlines import Deadlines
from gateway.dataplane.upstream.base import Body, Origin
from gateway.dataplane.upstream.wire import (
    CHUNKED,
    IDEMPOTENT,
    IDLE_LIMIT_S,
    TurnWrites,
    request_head,
)
from gateway.errors import (
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)

# Bytes of an answer's body held unread before the connection stops being read.
BUFFER_LIMIT = 2**16
# Statuses whose answers have no body whatever their headers say (RFC 9110 6.4.1).
_NO_BODY_STATUSES = frozenset({204, 304})


class _Unanswered(UpstreamConnectError):
    """The connection closed before a byte of the answer came: for a request on a pooled
    connection, most likely one the upstream closed while it sat idle."""


class _Connection(asyncio.Protocol):
    """One connection to one origin, and the exchange in progress on it (at most one)."""

    __slots__ = (
        "_client",
        "_drained",
        "_paused",
        "_write_paused",
        "body_sent",
        "buffered",
        "chunks",
        "closed",
        "complete",
        "counted",
        "failure",
        "got_bytes",
        "head",
        "head_done",
        "headers",
        "idle_since",
        "interim",
        "keep_alive",
        "method",
        "origin",
        "parser",
        "push",
        "push_failure",
        "reader",
        "status",
        "timers",
        "to_eof",
        "transport",
        "writer",
    )

    def __init__(self, client: HttptoolsClient, origin: Origin) -> None:
        self._client = client
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.counted = True  # in the client's count of open connections
        self.closed = False
        self.idle_since = 0.0
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self.parser: httptools.HttpResponseParser | None = None
        self.writer: asyncio.Task[None] | None = None
        self.timers: dict[_Connection, None] | None = None  # the pushed body's read timer
        self._reset()

    def _reset(self) -> None:
        self.method = ""
        self.head: asyncio.Future[None] | None = None
        self.reader: asyncio.Future[None] | None = None
        self.head_done = False
        self.interim = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.to_eof = False
        self.got_bytes = False
        self.body_sent = True
        self.failure: UpstreamError | None = None
        self.push: Callable[[bytes], bool] | None = None  # the consumer a body is pushed to
        self.push_failure: Exception | None = None  # what the consumer raised

    # --- asyncio's protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport; it has its API).
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client.forget(self)
        if self.parser is not None and not self.complete:
            if self.head_done and self.to_eof and exc is None:
                self._finish(keep_alive=False)  # a body framed by the connection's close
            elif not self.head_done and not self.got_bytes:
                self._fail(_Unanswered("the upstream closed the connection without answering"))
            elif self.head_done and exc is None:
                self._fail(UpstreamBadResponse("the upstream closed the connection mid-body"))
            else:
                why = f": {exc.__class__.__name__}: {exc}" if exc is not None else ""
                self._fail(UpstreamConnectError(f"the upstream connection was lost{why}"))
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.complete:
            # Bytes no request asked for (or a body after a HEAD answer).
            self.keep_alive = False
            self._close()
            return
        self.got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A protocol switch (101): the answer is its head; the connection is not HTTP now.
            if self.head_done:
                self._finish(keep_alive=False)
            else:
                self._fail(UpstreamBadResponse("upstream switched protocols before an answer"))
            self._close()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBadResponse(f"upstream answer unreadable: {exc}"))
            self._close()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # --- httptools' parser callbacks -----------------------------------------------------------

    # After the answer's end, the parser reads whatever follows as another answer: bytes no
    # request asked for (or a body after a HEAD answer). They are dropped, and so is the
    # connection, whose framing can no longer be trusted.

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            self.keep_alive = False
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        if self.complete:
            self.keep_alive = False
            return
        status = self.parser.get_status_code()
        if 100 <= status <= 199 and status != 101:  # interim (100 Continue, 103 Early Hints)
            self.interim = True
            self.headers = []
            return
        self.status = status
        self.head_done = True
        if self.method == "HEAD":
            self._finish(keep_alive=self.parser.should_keep_alive())
        elif status not in _NO_BODY_STATUSES:
            self.to_eof = _framed_by_close(self.headers)
        self._wake_head()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.keep_alive = False
            return
        if self.push is not None:
            self._pushed(self.push, body)
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > BUFFER_LIMIT:
            self.pause()
        self._wake_reader()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if not self.complete:
            assert self.parser is not None
            self._finish(keep_alive=self.parser.should_keep_alive())

    def _pushed(self, push: Callable[[bytes], bool], body: bytes) -> None:
        """Hand a piece straight to the consumer; the next piece's wait is timed from now. A
        consumer that is full, or fails, stops the push: reading pauses, the pushing coroutine
        wakes, and what the parser still feeds from this read is buffered as when pulled."""
        timers = self.timers
        if timers is not None:
            timers.pop(self, None)
            self.timers = self._client.deadlines.start(self, None)
        try:
            more = push(body)
        except Exception as exc:  # the consumer's fault, not the upstream's
            self.push_failure = exc
            more = False
        if not more:
            self.push = None
            self.pause()
            self._wake_reader()

    # --- the exchange --------------------------------------------------------------------------

    def begin(self, method: str) -> None:
        """Start an exchange: `head` is done once the answer's head is in."""
        self._reset()
        self.method = method
        self.parser = httptools.HttpResponseParser(self)
        self.head = asyncio.get_running_loop().create_future()

    def _finish(self, *, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive
        self._wake_head()
        self._wake_reader()

    def _fail(self, failure: UpstreamError) -> None:
        if self.failure is None and not self.complete:
            self.failure = failure
        head = self.head
        if head is not None and not head.done():
            head.set_exception(failure)
        self._wake_reader()

    def _wake_head(self) -> None:
        head = self.head
        if head is not None and not head.done():
            head.set_result(None)

    def _wake_reader(self) -> None:
        reader = self.reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def timed_out(self) -> None:
        """No head, or no more of the body, within the read timeout."""
        if self.complete or self.failure is not None:
            return
        when = "more of the body" if self.head_done else "an answer"
        self._fail(UpstreamTimeout(f"upstream sent no {when} within the read timeout"))
        self._close()

    async def wait_head(self, deadlines: Deadlines[_Connection, None]) -> None:
        head = self.head
        assert head is not None
        if head.done():
            head.result()
            return
        timers = deadlines.start(self, None)
        try:
            await head
        finally:
            deadlines.stop(self, timers)

    async def wait_body(self, deadlines: Deadlines[_Connection, None]) -> None:
        """Wait for more of the body, its end or its failure, for up to the read timeout."""
        self.reader = reader = asyncio.get_running_loop().create_future()
        timers = deadlines.start(self, None)
        try:
            await reader
        finally:
            deadlines.stop(self, timers)
            self.reader = None

    async def wait_pushed(self, push: Callable[[bytes], bool]) -> None:
        """Push the body's pieces to `push` as the parser reads them, until the body ends,
        fails, or the consumer is full or fails (`push` is then None again). Each wait for
        the next piece is timed by the read timeout, as when pulled."""
        self.push = push
        self.reader = reader = asyncio.get_running_loop().create_future()
        deadlines = self._client.deadlines
        self.timers = deadlines.start(self, None)
        try:
            await reader
        finally:
            timers, self.timers = self.timers, None
            if timers is not None:
                deadlines.stop(self, timers)
            self.reader = None
            self.push = None

    def take(self) -> bytes:
        """The body bytes that have arrived, taken off the buffer; reading resumes."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self.resume()
        return data

    def pause(self) -> None:
        if not self._paused:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                self._paused = True
                transport.pause_reading()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    async def write_body(self, body: AsyncIterable[bytes]) -> None:
        """Send a streamed body in chunks. A body that raises is cut, with the connection:
        the exception goes to whoever waits for the answer's head, or ends the answer's body
        as a failure if the head came first."""
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if chunk and not self.closed:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                    if self._write_paused:
                        await self._drain()
            if not self.closed:
                transport.write(b"0\r\n\r\n")
                self.body_sent = True
        except asyncio.CancelledError:
            self._close(abort=True)  # the exchange was given up: nothing more goes out
            raise
        except Exception as exc:  # the body's own failure (too large, its client gone)
            head = self.head
            if head is not None and not head.done():
                head.set_exception(exc)
            else:
                self._fail(UpstreamConnectError("the request body ended early"))
            self._close(abort=True)

    async def _drain(self) -> None:
        self._drained = drained = asyncio.get_running_loop().create_future()
        try:
            await drained
        finally:
            self._drained = None

    def _close(self, *, abort: bool = False) -> None:
        self.keep_alive = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if abort:
                transport.abort()
            else:
                transport.close()

    def end(self) -> None:
        """The exchange is over: the connection goes back to the pool if the answer was read
        to its end and both sides keep it alive, else it is closed."""
        writer = self.writer
        if writer is not None:
            self.writer = None
            if not writer.done():
                writer.cancel()  # it closes the connection: the body is left unsent
                self.body_sent = False
        reusable = (
            self.complete
            and self.keep_alive
            and self.failure is None
            and self.body_sent
            and not self.chunks
            and not self.closed
        )
        self.parser = None
        self.head = None
        if reusable:
            self._client.pool(self)
        else:
            self._close()


class _Response:
    """An upstream answer whose head is in; the body is read from its connection."""

    __slots__ = ("_connection", "_deadlines", "headers", "status")

    def __init__(self, connection: _Connection, deadlines: Deadlines[_Connection, None]) -> None:
        self._connection: _Connection | None = connection
        self._deadlines = deadlines
        self.status = connection.status
        self.headers = connection.headers

    def complete_body(self) -> bytes | None:
        connection = self._connection
        if connection is None or not connection.complete or connection.failure is not None:
            return None
        return connection.take() if connection.chunks else b""

    async def chunks(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        while True:
            if connection.chunks:
                yield connection.take()
            elif connection.complete:
                return
            elif connection.failure is not None:
                raise connection.failure
            else:
                await connection.wait_body(self._deadlines)

    async def push_chunks(
        self, on_chunk: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]]
    ) -> None:
        """Hand the body to `on_chunk` piece by piece, each as the parser reads it, from
        within the connection's read; return at the body's end (dataplane/upstream/base.py).

        When `on_chunk` returns False, reading stops until `drain()` returns; the wait is the
        consumer's and is not timed. A body cut short raises the `UpstreamError` `chunks()`
        would; an exception from `on_chunk` stops the body and is raised as it is. Cancelled,
        the body is left unread: `aclose()` closes the connection."""
        connection = self._connection
        if connection is None:
            return
        while True:
            if connection.chunks:  # what came before, or while the consumer was full
                if not on_chunk(connection.take()):
                    connection.pause()
                    await drain()
                    connection.resume()
            elif connection.complete:
                return
            elif connection.failure is not None:
                raise connection.failure
            else:
                await connection.wait_pushed(on_chunk)
                failure, connection.push_failure = connection.push_failure, None
                if failure is not None:
                    raise failure
                if connection._paused:  # the consumer is full
                    await drain()
                    if not connection.chunks:  # else taking them resumes reading
                        connection.resume()

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.end()


class HttptoolsClient:
    """Keep-alive pools, one per origin, of at most `max_connections` connections in all."""

    def __init__(
        self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self.deadlines: Deadlines[_Connection, None] = Deadlines(
            read_timeout_s, _timed_out, resolution_s=min(read_timeout_s / 10, 0.5)
        )
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0  # connections open or being opened, pooled or in use
        self._waiting: deque[asyncio.Future[None]] = deque()  # for the count to drop
        self._routes: dict[Origin, tuple[str, str]] = {}  # Host header, path prefix
        self._writes = TurnWrites()
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    async def send(
        self, method: str, origin: Origin, target: str, headers: list[tuple[str, str]], body: Body
    ) -> _Response:
        route = self._routes.get(origin)
        if route is None:
            route = self._routes[origin] = (origin.authority, origin.base_path)
        streamed = body is not None and not isinstance(body, bytes)
        length = CHUNKED if streamed else len(body) if body else 0  # type: ignore[arg-type]
        message = request_head(method, route[0], route[1], target, headers, length)
        if body and not streamed:
            message += body  # type: ignore[operator]
        # A streamed body cannot be sent twice: it is read as it is sent.
        retry = method in IDEMPOTENT and not streamed
        while True:
            connection, pooled = await self._connection(origin)
            connection.begin(method)
            transport = connection.transport
            assert transport is not None
            if streamed:
                transport.write(message)
                connection.body_sent = False
                connection.writer = asyncio.create_task(
                    connection.write_body(body)  # type: ignore[arg-type]
                )
            else:
                self._writes.add(transport, message)
            try:
                await connection.wait_head(self.deadlines)
            except _Unanswered:
                connection.end()
                if pooled and retry:
                    retry = False
                    continue
                raise
            except BaseException:
                connection.end()
                raise
            return _Response(connection, self.deadlines)

    async def _connection(self, origin: Origin) -> tuple[_Connection, bool]:
        """A pooled connection to `origin` (and True), or a new one (and False)."""
        while True:
            idle = self._idle.get(origin)
            if idle:
                now = time.monotonic()
                while idle:
                    connection = idle.pop()
                    if connection.closed or connection.transport is None:
                        continue
                    if now - connection.idle_since > IDLE_LIMIT_S:
                        self._drop(connection)
                        continue
                    return connection, True
            if self._closed:
                raise UpstreamConnectError("the upstream client is closed")
            if self._open < self._max_connections:
                return await self._open_connection(origin), False
            if not self._drop_idle_elsewhere(origin):
                waiter = asyncio.get_running_loop().create_future()
                self._waiting.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if waiter in self._waiting:
                        self._waiting.remove(waiter)
                    elif waiter.done() and not waiter.cancelled():
                        self._wake_one()  # the room it was woken for goes to the next
                    raise

    async def _open_connection(self, origin: Origin) -> _Connection:
        self._open += 1
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls is not None else None,
                )
        except TimeoutError as exc:
            self._uncount()
            raise UpstreamTimeout("no connection to the upstream within the timeout") from exc
        except OSError as exc:
            self._uncount()
            raise UpstreamConnectError(f"upstream failed: {exc.__class__.__name__}: {exc}") from exc
        except BaseException:
            self._uncount()
            raise
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _drop_idle_elsewhere(self, origin: Origin) -> bool:
        """At the limit, close one idle connection to another origin to make room."""
        for other, idle in self._idle.items():
            if other != origin and idle:
                self._drop(idle.pop())
                return True
        return False

    def _drop(self, connection: _Connection) -> None:
        self.forget(connection)
        connection._close()

    def pool(self, connection: _Connection) -> None:
        """Keep `connection` for the next request to its origin."""
        if self._closed:
            self._drop(connection)
            return
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin, []).append(connection)
        self._wake_one()

    def forget(self, connection: _Connection) -> None:
        """`connection` no longer counts against the limit (it is closed or closing)."""
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
        if connection.counted:
            connection.counted = False
            self._uncount()

    def _uncount(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        self.deadlines.close()
        for idle in self._idle.values():
            while idle:
                self._drop(idle.pop())
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports call connection_lost


def _timed_out(connection: _Connection, _: None) -> None:
    connection.timed_out()


def _framed_by_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an answer's body ends where its connection closes: it has no Content-Length
    and is not chunked (RFC 9112 6.3). llhttp knows too, but httptools has no call that tells
    it of the close, so the connection's end is taken as the body's here."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            return False
        if lowered == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked"):
            return False
    return True
