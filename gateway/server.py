"""Serves a Gateway: the data plane and the admin side, two uvicorn servers on one loop.

Shutdown on SIGTERM/SIGINT, step by step: both servers stop accepting, in-flight requests
finish (up to `shutdown_grace_s`), then the gateway flushes and closes its clients and store.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.app import Gateway


class _CoalescingTransport:
    """uvicorn writes a response's head and its body with two `transport.write` calls: two
    send() system calls and two TCP segments, and the client woken twice. This holds the
    writes made in one turn of the event loop and sends them together at the end of it."""

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
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with two changes.

    httptools hands chunked trailer fields to `on_header` too, and uvicorn appends them to
    the request's headers, where nothing can tell them apart: a client could smuggle a unit id
    or a rule's header past an edge that strips or signs them. Only the head's fields count.

    Writes go through a `_CoalescingTransport`: one send() per response instead of two
    (~30 us of CPU per proxied request here, bench/RESULTS.md).
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


class _Server(uvicorn.Server):
    """A uvicorn server whose signals are handled by `serve_gateway`, for both servers at once."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _config(app: object, host: str, port: int, grace: float) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        loop="none",
        http=_GatewayHttpProtocol,
        access_log=False,
        # The gateway appends the peer's address to X-Forwarded-For itself; uvicorn must not
        # replace the peer with a client-supplied value first.
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=grace,
        log_level="warning",
    )


async def serve_gateway(gateway: Gateway, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT. With `reuse_port`, bind with SO_REUSEPORT so that several
    worker processes share the ports (`gateway serve --workers N`)."""
    s = gateway.settings
    grace = s.shutdown_grace_s
    data = _Server(_config(gateway.data_app, s.listen.host, s.listen.port, grace))
    admin = _Server(_config(gateway.admin_app, s.admin.host, s.admin.port, grace))
    data_sockets = admin_sockets = None
    if reuse_port:
        from gateway.workers import reuse_port_socket

        data_sockets = [reuse_port_socket(s.listen.host, s.listen.port)]
        admin_sockets = [reuse_port_socket(s.admin.host, s.admin.port)]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        data.should_exit = admin.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    async with gateway.running():
        await asyncio.gather(data.serve(data_sockets), admin.serve(admin_sockets))


def run(gateway: Gateway, *, reuse_port: bool = False) -> None:
    import uvloop

    uvloop.run(serve_gateway(gateway, reuse_port=reuse_port))
