"""The default upstream client: aiohttp's, for HTTP/1.1 model servers.

Measured in DESIGN 1: Starlette + aiohttp ~2,150 req/s against ~175 for httpx's default
transport on this kind of machine; most of the difference is httpcore's pool bookkeeping.

A request whose body is in memory (all but the largest) goes the direct way through aiohttp:
a connection from its pool (TCPConnector), the request head and body written in one call, the
response read by its protocol and C parser. `ClientSession.request` wraps the same parts in
request, response, cookie, redirect, trace and middleware objects that a proxy does not use:
~140 of the ~245 us of CPU a bare proxied request costs in-process here (bench/RESULTS.md).
A streamed request body goes through `ClientSession.request`, which writes it while the
response may already be arriving.

Two more of aiohttp's per-exchange costs are left out on the direct way (bench/RESULTS.md):
- `set_response_params` makes a new C response parser each time (~8,500 instructions). A
  parser is left at a message's end when its connection goes back to the pool, so the one
  set on a connection serves its next responses too, unless something else replaced it.
- aiohttp's read timeout arms a loop timer when the request is written and again at every
  arrival, and a whole answer usually arrives at once. The wait for the response head is
  timed with a `Deadlines` instead; aiohttp's timer watches only a body still arriving.

Request writes wait for the end of the event loop's turn (`_TurnWrites`). Under load a turn
runs many requests, ~50 us of Python apart: written as each was ready, every write found the
upstream asleep again and paid for waking it (11 us of CPU per write here, measured around
the call); sent together, they wake it about once. 8-12 % less CPU per request with every
feature on (bench/ab.py, bench/RESULTS.md). With one request in flight the turn ends
at once: the write waits for one poll of the sockets.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest, ConnectionKey
from aiohttp.connector import Connection
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from yarl import URL

from gateway.deadlines import Deadlines
from gateway.errors import UpstreamConnectError, UpstreamTimeout
from gateway.upstream.base import Body, Origin

# Methods that may be sent again when a pooled connection turns out to be closed: RFC 9110
# 9.2.2, as aiohttp's ClientSession does.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# aiohttp sends `Content-Length: 0` for a bodiless request of any other method; so do we.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# What aiohttp raises from the wire, and what a read timeout raises.
_FAILURES = (asyncio.TimeoutError, aiohttp.ClientError, OSError, HttpProcessingError)
# Where a connection's protocol keeps the parser the direct way set on it (see `_exchange`).
_OWN_PARSER = "_gateway_parser"


class _OriginRequest(ClientRequest):
    """The request TCPConnector.connect() is given for one origin: its pool key is worked
    out once, where aiohttp's property builds it again on every call."""

    @functools.cached_property
    def connection_key(self) -> ConnectionKey:
        return super().connection_key


class _Route:
    """What every request to one origin shares: the pool key and the Host header."""

    __slots__ = ("host", "key_request", "path_prefix")

    def __init__(self, origin: Origin) -> None:
        self.host = origin.authority
        self.path_prefix = origin.base_path
        # TCPConnector.connect() takes a ClientRequest for the pool key, the TLS settings and
        # the address; one per origin serves every request to it.
        url = URL.build(scheme=origin.scheme, host=origin.host, port=origin.port)
        loop = asyncio.get_running_loop()
        self.key_request = _OriginRequest("GET", url, loop=loop, ssl=True)


class _DirectResponse:
    __slots__ = ("_connection", "_payload", "headers", "status")

    def __init__(
        self,
        connection: Connection,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        payload: StreamReader,
    ) -> None:
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

    def complete_body(self) -> bytes | None:
        payload = self._payload
        if payload.is_eof() and payload.exception() is None:
            return payload.read_nowait()
        return None

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._payload.is_eof():
            connection.release()  # back to the pool, unless the protocol says it must close
        else:
            connection.close()  # the rest of the body is still on the wire


class _SessionResponse:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = list(response.raw_headers)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except _FAILURES as exc:
            raise _translate(exc) from exc

    def complete_body(self) -> None:
        return None

    async def aclose(self) -> None:
        self._response.release()


class AiohttpClient:
    """One aiohttp connection pool for every HTTP/1.1 upstream."""

    def __init__(
        self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int
    ) -> None:
        self._connector = aiohttp.TCPConnector(
            limit=max_connections, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True
        )
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._read_timeout_s = read_timeout_s
        self._head_deadlines: Deadlines[ResponseHandler, None] = Deadlines(
            read_timeout_s, _head_timed_out, resolution_s=min(read_timeout_s / 10, 0.5)
        )
        self._routes: dict[Origin, _Route] = {}
        self._writes = _TurnWrites()
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            timeout=self._timeout,
            auto_decompress=False,
            # The client's own headers are forwarded; none are invented.
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def send(
        self, method: str, origin: Origin, target: str, headers: list[tuple[str, str]], body: Body
    ) -> _DirectResponse | _SessionResponse:
        if body is not None and not isinstance(body, bytes):
            return await self._send_streamed(method, origin, target, headers, body)
        route = self._routes.get(origin)
        if route is None:
            route = self._routes[origin] = _Route(origin)
        head = _request_head(method, route, target, headers, body)
        message = head + body if body else head
        retry = method in _IDEMPOTENT
        while True:
            try:
                connection = await self._connector.connect(route.key_request, [], self._timeout)
            except _FAILURES as exc:
                raise _translate(exc) from exc
            try:
                return await self._exchange(connection, method, message)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # Most likely a pooled connection the upstream closed while it sat idle.
                connection.close()
                if not retry:
                    raise _translate(exc) from exc
                retry = False
            except _FAILURES as exc:
                connection.close()
                raise _translate(exc) from exc
            except BaseException:
                connection.close()
                raise

    async def _exchange(
        self, connection: Connection, method: str, message: bytes
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
        return _DirectResponse(connection, response.code, response.raw_headers, payload)

    async def _send_streamed(
        self, method: str, origin: Origin, target: str, headers: list[tuple[str, str]], body: Body
    ) -> _SessionResponse:
        url = URL(origin.url + target, encoded=True)  # Origin.url brackets an IPv6 host
        try:
            response = await self._session.request(
                method, url, headers=headers, data=body, allow_redirects=False, compress=None
            )
        except _FAILURES as exc:
            raise _translate(exc) from exc
        return _SessionResponse(response)

    async def aclose(self) -> None:
        self._head_deadlines.close()
        await self._session.close()  # and the connector it owns


class _TurnWrites:
    """Request writes held until the end of the event loop's turn, then sent one after
    another; a connection closed meanwhile gets nothing (its exchange fails as on any closed
    connection)."""

    __slots__ = ("_pending", "_scheduled")

    def __init__(self) -> None:
        self._pending: list[tuple[asyncio.Transport, bytes]] = []
        self._scheduled = False

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


def _request_head(
    method: str, route: _Route, target: str, headers: list[tuple[str, str]], body: bytes | None
) -> bytes:
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers])
    # The names and values come from a request httptools parsed, or from the gateway itself;
    # a line break in one would split the head, so it is refused rather than trusted.
    if fields.count("\n") != len(headers) or fields.count("\r") != len(headers):
        raise UpstreamConnectError("a forwarded header contains a line break")
    if body:
        length = f"Content-Length: {len(body)}\r\n"
    else:
        length = "" if method in _NO_BODY_METHODS else "Content-Length: 0\r\n"
    start = f"{method} {route.path_prefix}{target} HTTP/1.1\r\nHost: {route.host}\r\n"
    return f"{start}{fields}{length}\r\n".encode("latin-1")


def _head_timed_out(protocol: ResponseHandler, _: None) -> None:
    # What aiohttp's own read timeout raises: the exchange's `protocol.read()` raises it.
    protocol.set_exception(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))


def _translate(exc: BaseException) -> UpstreamConnectError | UpstreamTimeout:
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(f"upstream timed out: {exc.__class__.__name__}")
    return UpstreamConnectError(f"upstream failed: {exc.__class__.__name__}: {exc}")
