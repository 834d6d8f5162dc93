"""The direct aiohttp client (`upstream.client: aiohttp-direct`, for HTTP/1.1 model servers;
the default is the httptools client): aiohttp's connection pool, protocol and C response
parser, driven below `ClientSession`.

This module reaches into aiohttp's internals (`ClientRequest`, `ResponseHandler`, `Connection`,
the protocol's parser and read timeout), so it is loaded only through the seam
(gateway/dataplane/upstream/choice.py), only on the aiohttp releases it was tested with; the
httptools client (gateway/dataplane/upstream/httptools_client.py, public APIs only) takes its
place elsewhere. It keeps the same promises as the stock client on `ClientSession`
(gateway/dataplane/upstream/aiohttp_client.py; DESIGN 10: the same errors, no invented
headers, bodies undecoded, one retry of an idempotent request on a pooled connection the
upstream closed), and skips what a proxy does not use.

How, and why (bench/RESULTS.md, "Where the direct client's speed comes from", has the figures):
- A request whose body is in memory goes the direct way: a connection from aiohttp's pool
  (`TCPConnector`), the request head and body written in one call, the answer read by the
  connection's protocol and parser. `ClientSession.request` wraps the same parts in request,
  response, cookie, redirect, trace and middleware objects a proxy has no use for.
- A streamed request body goes through the stock client, on the same pool, because
  `ClientSession` writes the body while the answer may already be arriving.
- A connection the direct way has read an answer to its end on is kept by it for its origin's
  next direct request (`_Route.idle`) rather than handed back to aiohttp's pool: it stays
  acquired from the pool, so taking it again costs a list pop, not the pool's connect and
  release. `upstream.max_connections` still bounds the whole: the client counts what it
  holds, the stock requests in flight and the requests waiting for a connection, and hands
  kept connections back to the pool whenever that count would pass the limit, so no request
  waits on a connection kept idle for another origin or for the direct way.
- A connection keeps the response parser the direct way set on it: a parser is left at a
  message's end when its connection goes back to the pool, so it serves the connection's next
  answers too, unless something else (a HEAD, a `ClientSession` request) replaced it.
- The wait for the response head is timed by a `Deadlines` (one timer for many requests);
  aiohttp's own read timeout watches only a body still arriving, with the same limit.
- Request writes wait for the end of the event loop's turn (`TurnWrites`) and go out
  together, so an upstream is woken once for all the requests of a turn rather than once for
  each. With one request in flight the turn ends at once: the write waits for one poll of the
  sockets.
- A body can be pushed (`push_chunks`) rather than pulled: each piece the parser feeds is
  handed to a callback there and then, with no coroutine woken for it (`_PushReader`). The
  wait for each next piece is timed by a `Deadlines` too, in place of aiohttp's read timer,
  which would be set again (a loop timer made and cancelled) on every read.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest, ConnectionKey
from aiohttp.connector import Connection
from aiohttp.helpers import _EXC_SENTINEL
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from yarl import URL

from gateway.dataplane.deadlines import Deadlines
from gateway.dataplane.upstream.aiohttp_client import (
    FAILURES,
    AiohttpClient,
    SessionResponse,
    translate,
)
from gateway.dataplane.upstream.base import Body, Origin
from gateway.dataplane.upstream.wire import IDEMPOTENT, IDLE_LIMIT_S, TurnWrites, request_head
from gateway.errors import UpstreamBadResponse, UpstreamError

# What the direct way meets besides ClientSession's errors: the parser's own, which
# ClientSession would have wrapped in a ClientResponseError.
_FAILURES = (*FAILURES, HttpProcessingError)
# Where a connection's protocol keeps the parser the direct way set on it (see `_exchange`).
_OWN_PARSER = "_gateway_parser"
# Where a connection's protocol keeps the `_PushReader` of the body being pushed.
_PUSH = "_gateway_push"


class _OriginRequest(ClientRequest):
    """The request TCPConnector.connect() is given for one origin: its pool key is worked
    out once, where aiohttp's property builds it again on every call."""

    @functools.cached_property
    def connection_key(self) -> ConnectionKey:
        return super().connection_key


class _Route:
    """What every request to one origin shares: the pool key, the Host header, and the
    connections kept for its next requests."""

    __slots__ = ("host", "idle", "key_request", "path_prefix")

    def __init__(self, origin: Origin) -> None:
        self.host = origin.authority
        self.path_prefix = origin.base_path
        # TCPConnector.connect() takes a ClientRequest for the pool key, the TLS settings and
        # the address; one per origin serves every request to it.
        url = URL.build(scheme=origin.scheme, host=origin.host, port=origin.port)
        loop = asyncio.get_running_loop()
        self.key_request = _OriginRequest("GET", url, loop=loop, ssl=True)
        # Kept connections and when each was kept, the latest last.
        self.idle: list[tuple[Connection, float]] = []


class _DirectResponse:
    __slots__ = ("_client", "_connection", "_payload", "_route", "headers", "status")

    def __init__(
        self,
        client: DirectAiohttpClient,
        route: _Route,
        connection: Connection,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        payload: StreamReader,
    ) -> None:
        self._client = client
        self._route = route
        self._connection: Connection | None = connection
        self._payload = payload
        self.status = status
        self.headers = headers

    async def chunks(self) -> AsyncIterator[bytes]:
        payload = self._payload
        try:
            while chunk := await payload.readany():
                yield chunk
        except _FAILURES as exc:
            raise _translate(exc) from exc

    async def push_chunks(
        self, on_chunk: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]]
    ) -> None:
        """Hand the body to `on_chunk` piece by piece, each as the connection's parser feeds
        it, from within the parser's call; return at the body's end.

        When `on_chunk` returns False, reading from the upstream stops (as aiohttp's own
        buffer limit stops it, and its read timeout with it) until `drain()` returns. A body
        cut short (the connection lost mid-body, a bad chunk, the read timeout) raises the
        `UpstreamError` `chunks()` would; an exception from `on_chunk` stops the body and is
        raised as it is. Cancelled, the body is left unread: `aclose()` closes the connection.
        """
        payload, connection = self._payload, self._connection
        protocol = connection.protocol if connection is not None else None
        try:
            while data := payload.read_nowait():  # what came before: the pull way, in order
                if not on_chunk(data):
                    await drain()
        except _FAILURES as exc:
            raise _translate(exc) from exc
        if payload.is_eof():
            return
        if type(payload) is not StreamReader or protocol is None:
            async for chunk in self.chunks():
                if not on_chunk(chunk):
                    await drain()
            return
        # The read timeout is the reader's from here: aiohttp's timer is dropped for good (the
        # next exchange on the connection sets it again if its body needs it).
        protocol.read_timeout = None
        protocol._drop_timeout()
        reader = _PushReader(protocol, on_chunk, self._client.body_deadlines)
        setattr(protocol, _PUSH, reader)
        payload.__class__ = _PushStream
        try:
            while await reader.wait() is _Push.PAUSED:
                await drain()
                reader.resume()
        finally:
            reader.stop_timer()
            payload.__class__ = StreamReader
            setattr(protocol, _PUSH, None)
        if reader.failure is not None:
            if reader.state is _Push.CUT:
                raise _translate(reader.failure) from reader.failure
            raise reader.failure

    def complete_body(self) -> bytes | None:
        payload = self._payload
        if not payload.is_eof() or payload.exception() is not None:
            return None
        connection = self._connection
        protocol = connection.protocol if connection is not None else None
        if (
            type(payload) is not StreamReader
            or protocol is None
            or protocol._reading_paused
            or getattr(protocol, "_buffer_paused", False)
            or payload._buffer_offset
        ):
            return payload.read_nowait()
        # The whole body is in the reader's buffer and nothing paused the connection: taken
        # from the buffer as it is. `read_nowait()` would resume the connection's reading on
        # every call, and resuming parses an empty read (`data_received(b"")`).
        buffer = payload._buffer
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        payload._size = 0
        return data

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._payload.is_eof():
            self._client.keep(self._route, connection)
        else:
            self._client.drop(connection)  # the rest of the body is still on the wire


class _Push(enum.Enum):
    FLOWING = "flowing"
    PAUSED = "paused"  # the consumer asked for a pause: the connection is not read
    ENDED = "ended"  # the body's clean end
    CUT = "cut"  # the upstream's failure mid-body
    REFUSED = "refused"  # the consumer raised


class _PushReader:
    """The consumer of one body being pushed: the parser's pieces go to `on_chunk`, and the
    pushing coroutine is woken only when the body ends or the consumer asks for a pause.

    While it reads, each wait for the next piece is timed (`deadlines`, of the read timeout):
    one that does not come in time cuts the body as aiohttp's read timeout would. A pause is
    the consumer's, not the upstream's: it is not timed."""

    __slots__ = ("_deadlines", "_on_chunk", "_protocol", "_timers", "_waiter", "failure", "state")

    def __init__(
        self,
        protocol: ResponseHandler,
        on_chunk: Callable[[bytes], bool],
        deadlines: Deadlines[_PushReader, None],
    ) -> None:
        self._protocol = protocol
        self._on_chunk = on_chunk
        self._deadlines = deadlines
        self._timers: dict[_PushReader, None] | None = deadlines.start(self, None)
        self._waiter: asyncio.Future[None] | None = None
        self.state = _Push.FLOWING
        self.failure: BaseException | None = None

    def chunk(self, data: bytes) -> None:
        state = self.state
        if state is not _Push.FLOWING and state is not _Push.PAUSED:
            return  # over: what the parser still feeds is left to the connection's close
        timers = self._timers
        if timers is not None:  # the next piece's wait starts now
            timers.pop(self, None)
            self._timers = self._deadlines.start(self, None)
        try:
            more = self._on_chunk(data)
        except Exception as exc:  # the consumer's fault, not the upstream's
            self._end(_Push.REFUSED, exc)
            self._protocol.pause_reading()
            return
        if not more and state is _Push.FLOWING:
            self._protocol.pause_reading()  # the parser stops after this piece
            self.state = _Push.PAUSED
            self.stop_timer()
            self._wake()

    def end(self, failure: BaseException | None) -> None:
        if self.state is _Push.FLOWING or self.state is _Push.PAUSED:
            self._end(_Push.ENDED if failure is None else _Push.CUT, failure)

    def timed_out(self) -> None:
        """No piece came within the read timeout: the body is cut, and no more is read."""
        self._timers = None
        if self.state is _Push.FLOWING:  # what still comes is dropped, until the close
            self._end(_Push.CUT, aiohttp.SocketTimeoutError("Timeout on reading data from socket"))

    def stop_timer(self) -> None:
        timers, self._timers = self._timers, None
        if timers is not None:
            timers.pop(self, None)

    def _end(self, state: _Push, failure: BaseException | None) -> None:
        self.state, self.failure = state, failure
        self.stop_timer()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> _Push:
        """The state, once it is no longer FLOWING."""
        if self.state is _Push.FLOWING:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.state

    def resume(self) -> None:
        """Read again after a pause; what the parser held back is fed at once."""
        if self.state is _Push.PAUSED:
            self.state = _Push.FLOWING
            self._timers = self._deadlines.start(self, None)
            self._protocol.resume_reading()


class _PushStream(StreamReader):
    """A response body's reader while the body is pushed: the parser's pieces go to the
    connection's `_PushReader` instead of the buffer, and the HTTP chunks' bounds, kept for
    reads of the buffer, are not kept. It adds no slot, so a StreamReader's class can be
    switched to it and back."""

    __slots__ = ()

    def begin_http_chunk_receiving(self) -> None:
        pass

    def end_http_chunk_receiving(self) -> None:
        pass

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        if data:
            getattr(self._protocol, _PUSH).chunk(data)
        return False

    def feed_eof(self) -> None:
        super().feed_eof()
        getattr(self._protocol, _PUSH).end(None)

    def set_exception(self, exc: BaseException, exc_cause: BaseException = _EXC_SENTINEL) -> None:
        super().set_exception(exc, exc_cause)
        getattr(self._protocol, _PUSH).end(exc)


class DirectAiohttpClient:
    """One aiohttp connection pool for every HTTP/1.1 upstream, shared by the direct way and
    the stock client it sends streamed bodies with."""

    def __init__(
        self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int
    ) -> None:
        self._stock = AiohttpClient(
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            max_connections=max_connections,
        )
        self._connector = self._stock.connector
        self._timeout = self._stock.timeout
        self._read_timeout_s = read_timeout_s
        resolution_s = min(read_timeout_s / 10, 0.5)
        self._head_deadlines: Deadlines[ResponseHandler, None] = Deadlines(
            read_timeout_s, _head_timed_out, resolution_s=resolution_s
        )
        self.body_deadlines: Deadlines[_PushReader, None] = Deadlines(
            read_timeout_s, _body_timed_out, resolution_s=resolution_s
        )
        self._routes: dict[Origin, _Route] = {}
        self._writes = TurnWrites()
        # What counts against the pool's limit, as this client knows it (see `keep`).
        self._limit = max_connections
        self._held = 0  # connections acquired by the direct way: in an exchange, or kept
        self._stock_exchanges = 0  # stock requests in flight, from send() to aclose()
        self._connecting = 0  # direct requests waiting for the pool's connect()
        self._closing = False

    async def send(
        self, method: str, origin: Origin, target: str, headers: list[tuple[str, str]], body: Body
    ) -> _DirectResponse | SessionResponse:
        if body is not None and not isinstance(body, bytes):
            return await self._send_stock(method, origin, target, headers, body)
        route = self._routes.get(origin)
        if route is None:
            route = self._routes[origin] = _Route(origin)
        head = request_head(
            method, route.host, route.path_prefix, target, headers, len(body) if body else 0
        )
        message = head + body if body else head
        retry = method in IDEMPOTENT
        while True:
            connection = self._take(route) if route.idle else None
            if connection is None:
                connection = await self._connect(route)
            try:
                return await self._exchange(connection, route, method, message)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # Most likely a pooled connection the upstream closed while it sat idle.
                self.drop(connection)
                if not retry:
                    raise _translate(exc) from exc
                retry = False
            except _FAILURES as exc:
                self.drop(connection)
                raise _translate(exc) from exc
            except BaseException:
                self.drop(connection)
                raise

    def _take(self, route: _Route) -> Connection | None:
        """The connection kept latest for `route`'s origin that is still open and not idle
        too long; None when there is none."""
        idle = route.idle
        now = time.monotonic()
        if now - idle[0][1] > IDLE_LIMIT_S:  # the oldest: closed so that idle ones do not pile up
            self.drop(idle.pop(0)[0])
        while idle:
            connection, kept_at = idle.pop()
            protocol = connection.protocol
            if protocol is not None and protocol.is_connected() and now - kept_at <= IDLE_LIMIT_S:
                return connection
            self.drop(connection)
        return None

    async def _connect(self, route: _Route) -> Connection:
        """A connection from aiohttp's pool, or a new one, once the limit leaves room."""
        self._connecting += 1
        try:
            self._make_room()
            connection = await self._connector.connect(route.key_request, [], self._timeout)
        except _FAILURES as exc:
            raise _translate(exc) from exc
        finally:
            self._connecting -= 1
        self._held += 1
        return connection

    async def _send_stock(
        self, method: str, origin: Origin, target: str, headers: list[tuple[str, str]], body: Body
    ) -> SessionResponse:
        self._stock_exchanges += 1
        route = self._routes.get(origin)
        if route is not None and route.idle:  # for the stock request to take from the pool
            self._hand_back(route.idle.pop()[0])
        try:
            self._make_room()
            response = await self._stock.send(method, origin, target, headers, body)
        except BaseException:
            self._stock_exchanges -= 1
            raise
        response.on_close = self._stock_closed
        return response

    def _stock_closed(self) -> None:
        self._stock_exchanges -= 1

    def _over_limit(self) -> bool:
        return self._held + self._stock_exchanges + self._connecting > self._limit

    def _make_room(self) -> None:
        """While the connections held, wanted and waited for pass the limit, hand kept
        connections back to the pool, where a waiting request can have them."""
        while self._over_limit():
            idle = next((route.idle for route in self._routes.values() if route.idle), None)
            if idle is None:
                return  # every connection is in an exchange: the pool queues the request
            self._hand_back(idle.pop(0)[0])

    def keep(self, route: _Route, connection: Connection) -> None:
        """`connection`'s answer was read to its end: keep it for the origin's next direct
        request, or hand it back to the pool (which closes it if the protocol says it must)
        if the client is closing or a request waits for room."""
        protocol = connection.protocol
        if self._closing or protocol is None or protocol.should_close or self._over_limit():
            self._hand_back(connection)
            return
        route.idle.append((connection, time.monotonic()))

    def _hand_back(self, connection: Connection) -> None:
        """Give `connection` back to aiohttp's pool, which keeps it or closes it."""
        self._held -= 1
        connection.release()

    def drop(self, connection: Connection) -> None:
        """Close `connection`: what is left of its exchange cannot be read."""
        self._held -= 1
        connection.close()

    async def _exchange(
        self, connection: Connection, route: _Route, method: str, message: bytes
    ) -> _DirectResponse:
        protocol, transport = connection.protocol, connection.transport
        if protocol is None or transport is None:
            raise aiohttp.ServerDisconnectedError()
        parser = getattr(protocol, "_parser", None)
        if method == "HEAD" or parser is None or parser is not getattr(protocol, _OWN_PARSER, None):
            protocol.set_response_params(
                skip_payload=method == "HEAD",
                read_until_eof=True,  # no length and no chunks: the body ends at the close
                auto_decompress=False,
            )
            # A parser for HEAD expects no bodies; a ClientSession request sets its own.
            setattr(protocol, _OWN_PARSER, None if method == "HEAD" else protocol._parser)
        elif protocol.read_timeout is not None:
            protocol.read_timeout = None  # set below for the previous response's body
        self._writes.add(transport, message)
        deadlines = self._head_deadlines
        timers = deadlines.start(protocol, None)
        try:
            while True:
                response, payload = await protocol.read()
                # 1xx interim responses (100 Continue, 103 Early Hints) precede the real one.
                if not 100 <= response.code <= 199 or response.code == 101:
                    break
        finally:
            deadlines.stop(protocol, timers)
        if not payload.is_eof():
            # The rest of the body is on its way: each wait for more of it gets the read
            # timeout, from aiohttp's timer, as on the ClientSession way.
            protocol.read_timeout = self._read_timeout_s
            protocol.start_timeout()
        code, raw_headers = response.code, response.raw_headers
        return _DirectResponse(self, route, connection, code, raw_headers, payload)

    async def aclose(self) -> None:
        self._closing = True
        for route in self._routes.values():
            while route.idle:
                self.drop(route.idle.pop()[0])
        self._head_deadlines.close()
        self.body_deadlines.close()
        await self._stock.aclose()  # and the connector its session owns


def _head_timed_out(protocol: ResponseHandler, _: None) -> None:
    # What aiohttp's own read timeout raises: the exchange's `protocol.read()` raises it.
    protocol.set_exception(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))


def _body_timed_out(reader: _PushReader, _: None) -> None:
    reader.timed_out()


def _translate(exc: BaseException) -> UpstreamError:
    if isinstance(exc, HttpProcessingError):  # an answer that is not HTTP: a bad response
        return UpstreamBadResponse(f"upstream answer unreadable: {exc.__class__.__name__}: {exc}")
    return translate(exc)
