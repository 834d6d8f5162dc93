"""Serves a Gateway: the data plane and the admin side, two uvicorn servers on one loop.

Shutdown on SIGTERM/SIGINT, step by step: both servers stop accepting, in-flight requests
finish (up to `shutdown_grace_s`), then the gateway flushes and closes its clients and store.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn

from gateway import heap
from gateway.app import Gateway
from gateway.http_protocol import GatewayHttpProtocol


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
        http=GatewayHttpProtocol,
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
    # The proxy itself, not `data_app`: the lifespan is run here (`gateway.running()`), and
    # the wrapper that answers it for other ASGI servers would be one more call per request.
    data = _Server(_config(gateway.proxy, s.listen.host, s.listen.port, grace))
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
    gateway.after_preload = heap.freeze_after_load
    async with gateway.running():
        heap.freeze_after_startup()
        await asyncio.gather(data.serve(data_sockets), admin.serve(admin_sockets))


def run(gateway: Gateway, *, reuse_port: bool = False) -> None:
    import uvloop

    uvloop.run(serve_gateway(gateway, reuse_port=reuse_port))
