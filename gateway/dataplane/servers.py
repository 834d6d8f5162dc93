"""The seam between the data plane and the HTTP server that serves its port (`server.http`).

Every server is a `ServerAdapter`: it turns the data port's settings (`DataPort`) into a server
that runs on the current event loop until it is told to stop. Two exist:

- `fast`: uvicorn with the gateway's own HTTP/1.1 protocol (`gateway/dataplane/fast/`), the only
  code that reaches into uvicorn's internals. It is imported only when chosen, and only on the
  uvicorn versions it was tested on (`UVICORN_TESTED`, pyproject's bounds).
- `stock`: uvicorn's own httptools protocol, through uvicorn's public API only.

`choose` falls back to `stock` where `fast` cannot be had (a uvicorn outside the tested range,
a failed import), with one warning that names what is then not kept; the gateway's
`gateway_build_info{server}` names the server actually in use. What a server does not keep of
the fast protocol's promises is its `not_kept` (docs/fast-path.md lists them too).

The app learns what the server offers beyond ASGI from the scope's `extensions`: `RESPOND_WHOLE`,
`ABORT_RESPONSE` and `CHUNK_WRITER` (only `fast` offers them; the proxy uses plain ASGI messages
without them).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from gateway.settings import Limits

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)

# Scope extensions (ASGI `scope["extensions"]`), offered only by the fast protocol:
# `respond(send, status, headers, body) -> bool` answers with a whole response in one write, or
# returns False having written nothing; `abort(send) -> bool` resets the client's connection
# mid-response, or returns False having done nothing. `send` is the one the server gave the app.
RESPOND_WHOLE = "gateway.respond_whole"
ABORT_RESPONSE = "gateway.abort_response"
# `writer(send) -> ChunkWriter | None`: for a response whose head went out through `send` with a
# chunked body, an object that writes the body's chunks straight to the client's connection
# (below); None where the response cannot take it (the app then sends ASGI messages).
CHUNK_WRITER = "gateway.chunk_writer"

# [floor, ceiling) of the (major, minor) versions the suites ran on; pyproject bounds the
# package to the same range (tests/core/test_servers.py checks that they agree).
UVICORN_TESTED = ((0, 55), (0, 56))

FAST_MODULE = "gateway.dataplane.fast.http_protocol"

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

# What uvicorn's own protocol does not keep of the fast protocol's promises, and what it does
# instead (docs/fast-path.md, "What stock keeps").
STOCK_NOT_KEPT = (
    "limits.head_timeout_s (a request head has no deadline; a connection that sends nothing "
    "stays open)",
    "limits.max_connections as a refusal (beyond it, every new request gets uvicorn's 503 "
    "until connections close)",
    "gateway_connections_refused_total (nothing is counted)",
    "a reset on an upstream failure mid-body (the connection is closed after a short body)",
    "the trailer defence (a chunked request's trailer fields are forwarded as header fields)",
    "one write per response",
    "event streams relayed without an ASGI message per chunk (each chunk is one, through "
    "uvicorn's send)",
)


@dataclass(frozen=True, slots=True)
class DataPort:
    """What any server is given to serve the data port with."""

    app: ASGIApp
    host: str
    port: int
    limits: Limits
    grace_s: float
    # Called with a reason for each connection the server closes for a limit, where the server
    # can tell (the `gateway_connections_refused_total` counter).
    refused: Callable[[str], object]
    # A bound socket to serve on (SO_REUSEPORT workers), else the server binds host:port.
    sock: socket.socket | None = None


class ChunkWriter(Protocol):
    """Writes one response's body to the client as HTTP/1.1 chunks, without an ASGI message
    per chunk. Obtained through the `CHUNK_WRITER` extension once the head is out."""

    def __call__(self, chunk: bytes) -> bool:
        """Write `chunk` as one chunk (an empty one writes nothing: it would end the body).
        Returns False once the client is not keeping up (the connection's write buffer is
        full): write no more until `drain()` returns. A client that went away is not an error:
        what is written is dropped."""

    @property
    def holding(self) -> bool:
        """Whether bytes of this response written in this turn of the event loop wait to be
        sent together at its end (what is written now reaches the client with them)."""

    async def drain(self) -> None:
        """Return once the client's connection can take more, or the client has gone."""

    def end(self) -> None:
        """Write the last chunk: the response is complete (the connection is closed after it
        where it is not kept alive)."""


class RunningServer(Protocol):
    async def serve(self) -> None:
        """Serve until `stop()`; then accept nothing new, let requests in flight finish (up to
        the grace period) and return."""

    def stop(self) -> None:
        """Ask `serve()` to wind down; returns at once."""


class ServerAdapter(Protocol):
    """One kind of HTTP server for the data port."""

    @property
    def name(self) -> str:
        """`server.http`'s value for it, and the `server` label of `gateway_build_info`."""

    @property
    def not_kept(self) -> tuple[str, ...]:
        """The fast protocol's promises this server does not keep, each with what it does."""

    def data_server(self, port: DataPort) -> RunningServer: ...


# --- uvicorn, through its public API ---------------------------------------------------------


def uvicorn_server(
    app: ASGIApp,
    host: str,
    port: int,
    grace_s: float,
    *,
    http: str | type[Any] = "httptools",
    keep_alive_s: float = 5.0,
    limit_concurrency: int | None = None,
) -> uvicorn.Server:
    """A uvicorn server on the running loop, whose signals the caller handles."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        loop="none",
        http=http,
        # uvicorn counts the keep-alive wait in whole seconds.
        timeout_keep_alive=max(1, math.ceil(keep_alive_s)),
        limit_concurrency=limit_concurrency,
        access_log=False,
        # The gateway appends the peer's address to X-Forwarded-For itself; uvicorn must not
        # replace the peer with a client-supplied value first.
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=math.ceil(grace_s),
        log_level="warning",
    )
    return Server(config)


class _UvicornRunning:
    __slots__ = ("_on_exit", "_server", "_sock")

    def __init__(
        self,
        server: uvicorn.Server,
        sock: socket.socket | None,
        on_exit: Callable[[], None] = lambda: None,
    ) -> None:
        self._server, self._sock, self._on_exit = server, sock, on_exit

    async def serve(self) -> None:
        try:
            await self._server.serve(None if self._sock is None else [self._sock])
        finally:
            self._on_exit()

    def stop(self) -> None:
        self._server.should_exit = True


class FastUvicorn:
    """uvicorn with the gateway's HTTP/1.1 protocol (gateway/dataplane/fast/http_protocol.py)."""

    name = "fast"
    not_kept: tuple[str, ...] = ()

    def data_server(self, port: DataPort) -> RunningServer:
        from gateway.dataplane.fast.http_protocol import ConnectionLimits, GatewayHttpProtocol

        limits = ConnectionLimits(
            head_timeout_s=port.limits.head_timeout_s,
            max_connections=port.limits.max_connections,
            refused=port.refused,
        )
        server = uvicorn_server(
            port.app,
            port.host,
            port.port,
            port.grace_s,
            http=GatewayHttpProtocol.with_limits(limits),
            keep_alive_s=port.limits.keepalive_timeout_s,
        )
        return _UvicornRunning(server, port.sock, limits.close)


class StockUvicorn:
    """uvicorn's own httptools protocol."""

    name = "stock"
    not_kept = STOCK_NOT_KEPT

    def data_server(self, port: DataPort) -> RunningServer:
        server = uvicorn_server(
            port.app,
            port.host,
            port.port,
            port.grace_s,
            keep_alive_s=port.limits.keepalive_timeout_s,
            # uvicorn answers 503 once its connections (this one included) reach the limit.
            limit_concurrency=port.limits.max_connections + 1,
        )
        return _UvicornRunning(server, port.sock)


# --- the choice -------------------------------------------------------------------------------

ADAPTERS: dict[str, Callable[[], ServerAdapter]] = {
    "fast": FastUvicorn,
    "stock": StockUvicorn,
}
# What a kind needs besides uvicorn's public API: (distribution, tested range, module to import).
_NEEDS: dict[str, tuple[str, tuple[tuple[int, int], tuple[int, int]], str]] = {
    "fast": ("uvicorn", UVICORN_TESTED, FAST_MODULE),
}


def installed_version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def in_range(found: str, tested: tuple[tuple[int, int], tuple[int, int]]) -> bool:
    """Whether `found` ("0.55.2", "2.8.9rc1") lies in [floor, ceiling) by (major, minor)."""
    parts = found.split(".")
    try:
        major_minor = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "x"))
    except (IndexError, ValueError):
        return False
    floor, ceiling = tested
    return floor <= major_minor < ceiling


def resolve(
    kind: str,
    *,
    version_of: Callable[[str], str | None] = installed_version,
    load: Callable[[str], ModuleType] = importlib.import_module,
) -> tuple[ServerAdapter, str | None]:
    """The adapter for `kind`, and why it fell back to `stock` (None where it did not).

    The fast protocol is imported here, and only here, once uvicorn's version is one the
    suites ran on."""
    if kind not in ADAPTERS:
        raise ValueError(f"unknown server.http {kind!r}")
    needs = _NEEDS.get(kind)
    if needs is None:
        return ADAPTERS[kind](), None
    distribution, tested, module = needs
    found = version_of(distribution)
    (low, high) = tested
    if found is None:
        return StockUvicorn(), f"{distribution} is not installed"
    if not in_range(found, tested):
        span = f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"
        return StockUvicorn(), f"{distribution} {found} is outside the tested {span}"
    try:
        load(module)
    except Exception as exc:  # an internal renamed or moved: any failure to import is one
        return StockUvicorn(), f"importing {module} failed: {exc!r}"
    return ADAPTERS[kind](), None


@functools.cache
def choose(kind: str) -> ServerAdapter:
    """The adapter for `server.http: kind`, resolved once per process: a fallback is logged
    once, as one warning line naming what the stock server does not keep."""
    adapter, why = resolve(kind)
    if why is not None:
        log.warning(
            "server.http %s is not available: %s; serving with %s, which does not keep: %s",
            kind,
            why,
            adapter.name,
            "; ".join(adapter.not_kept),
        )
    return adapter
