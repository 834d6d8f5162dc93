"""httpx's connection pool, reached into for one repair: connections that a cancelled request
stranded.

httpcore 1.0 strands a connection when the request that opened it is cancelled in the one
event-loop turn between connecting and sending: the HTTP/1.1 connection stays NEW, and a NEW
connection is never given to another request, never idle and never expired. It keeps its socket
and its pool slot until the client closes. The gateway cancels upstream requests whenever their
clients leave, so a storm of departures leaves such connections behind, and enough of them fill
`upstream.max_connections` for good.

A request that is not cancelled leaves NEW within one loop turn of connecting, so a connection
still NEW a while after a cancellation is stranded and can be closed; the pool drops closed
connections by itself. Only the pool is private here: `connections`, `info()` and `aclose()`
are httpcore's API.
"""

from __future__ import annotations

from typing import Any

import httpcore
import httpx


def connection_pool(client: httpx.AsyncClient) -> httpcore.AsyncConnectionPool | None:
    """The client's default transport's pool, or None where this httpx keeps it elsewhere."""
    transport: Any = getattr(client, "_transport", None)
    pool = getattr(transport, "_pool", None)
    return pool if isinstance(pool, httpcore.AsyncConnectionPool) else None


def new_connections(pool: httpcore.AsyncConnectionPool) -> list[Any]:
    """The pool's HTTP/1.1 connections that are connected but have carried no request."""
    return [c for c in pool.connections if ", HTTP/1.1, NEW, " in c.info()]
