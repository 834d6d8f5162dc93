"""The httpx upstream client: HTTP/2 model servers, and users who prefer httpx."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx

from gateway.dataplane.fast.httpx_pool import connection_pool, new_connections
from gateway.dataplane.upstream.base import Body, Origin
from gateway.errors import (
    UnsendableRequest,
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)

# How long a connection may stay NEW after a cancellation before it counts as stranded
# (fast/httpx_pool.py). A request that goes on leaves NEW within one loop turn; even if a stalled
# loop made one wait longer, closing its connection only makes the pool hand it another.
STRANDED_AFTER_S = 1.0


class HttpxResponse:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = list(response.headers.raw)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc

    def complete_body(self) -> None:
        return None

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxClient:
    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        http2: bool,
    ) -> None:
        self._client = httpx.AsyncClient(
            http1=True,
            http2=http2,
            timeout=httpx.Timeout(
                read_timeout_s, connect=connect_timeout_s, pool=connect_timeout_s
            ),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=False,
            trust_env=False,
        )
        # The client's own headers are forwarded; httpx's defaults (User-Agent, Accept-Encoding:
        # gzip while bodies are relayed undecoded, ...) must not be invented on its behalf.
        self._client.headers.clear()
        self._pool = connection_pool(self._client)
        if self._pool is None:
            log.warning(
                "httpx keeps its connection pool elsewhere in this version: connections that "
                "cancelled requests strand are not closed until the client is"
            )
        self._cancelled_since_sweep = False
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    async def send(
        self, method: str, origin: Origin, target: str, headers: list[tuple[str, str]], body: Body
    ) -> HttpxResponse:
        path, _, query = target.partition("?")
        url = httpx.URL(
            scheme=origin.scheme,
            host=origin.host,
            port=origin.port,
            raw_path=(origin.base_path + path + ("?" + query if query else "")).encode("latin-1"),
        )
        # As bytes, the way they arrived: httpx encodes str values as ASCII and would refuse
        # obs-text (0x80-0xFF), which HTTP allows and the aiohttp client forwards as is.
        raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        try:
            request = self._client.build_request(method, url, headers=raw, content=body)
            response = await self._client.send(request, stream=True)
        except asyncio.CancelledError:
            self._sweep_soon()
            raise
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc
        except (ValueError, UnicodeError) as exc:  # a header httpx will not write
            raise UnsendableRequest(f"request refused by the client library: {exc}") from exc
        return HttpxResponse(response)

    def _sweep_soon(self) -> None:
        """After a cancelled request: close what it may have stranded, once it is clear."""
        if self._pool is None or self._closed:
            return
        self._cancelled_since_sweep = True
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._close_stranded())

    async def _close_stranded(self) -> None:
        assert self._pool is not None
        while self._cancelled_since_sweep:
            self._cancelled_since_sweep = False
            suspects = new_connections(self._pool)
            if not suspects:
                continue
            await asyncio.sleep(STRANDED_AFTER_S)
            still_new = {id(c) for c in new_connections(self._pool)}
            for connection in suspects:
                if id(connection) in still_new:
                    with contextlib.suppress(OSError):  # closing it is all that is wanted
                        await connection.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self._client.aclose()


def _translate(exc: httpx.HTTPError) -> UpstreamError:
    name = exc.__class__.__name__
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"upstream timed out: {name}")
    if isinstance(exc, httpx.LocalProtocolError):
        return UnsendableRequest(f"request refused by the client library: {name}: {exc}")
    # httpcore reports a peer that closed before answering as a protocol error too; that is
    # a connection failure, not a bad answer.
    if isinstance(exc, httpx.RemoteProtocolError) and "without sending a response" not in str(exc):
        return UpstreamBadResponse(f"upstream answer unreadable: {name}: {exc}")
    return UpstreamConnectError(f"upstream failed: {name}: {exc}")
