"""Serves a Gateway: the data port on the server `server.http` names (dataplane/servers.py) and
the admin port on stock uvicorn, both on one event loop.

Shutdown on SIGTERM/SIGINT, step by step: both servers stop accepting, in-flight requests
finish (up to `shutdown_grace_s`), then the gateway flushes and closes its clients and store.
"""

from __future__ import annotations

import asyncio
import signal

from gateway.app import Gateway
from gateway.dataplane import heap
from gateway.dataplane.servers import DataPort, choose, uvicorn_server


async def serve_gateway(gateway: Gateway, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT. With `reuse_port`, bind with SO_REUSEPORT so that several
    worker processes share the ports (`gateway serve --workers N`)."""
    s = gateway.settings
    grace = s.shutdown_grace_s
    data_socket = admin_sockets = None
    if reuse_port:
        from gateway.dataplane.workers import reuse_port_socket

        data_socket = reuse_port_socket(s.listen.host, s.listen.port)
        admin_sockets = [reuse_port_socket(s.admin.host, s.admin.port)]
    refused = gateway.metrics.connections_refused
    data = choose(s.server.http).data_server(
        DataPort(
            # The proxy itself, not `data_app`: the lifespan is run here (`gateway.running()`),
            # and the wrapper that answers it for other ASGI servers would be one more call
            # per request.
            app=gateway.proxy,
            host=s.listen.host,
            port=s.listen.port,
            limits=s.limits,
            grace_s=grace,
            refused=lambda reason: refused.labels(reason).inc(),
            sock=data_socket,
        )
    )
    admin = uvicorn_server(gateway.admin_app, s.admin.host, s.admin.port, grace)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        data.stop()
        admin.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    gateway.after_preload = heap.freeze_after_load
    async with gateway.running():
        heap.freeze_after_startup()
        await asyncio.gather(data.serve(), admin.serve(admin_sockets))


def run(gateway: Gateway, *, reuse_port: bool = False) -> None:
    import uvloop

    uvloop.run(serve_gateway(gateway, reuse_port=reuse_port))
