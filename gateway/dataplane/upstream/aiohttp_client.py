"""The stock aiohttp upstream client: aiohttp's public `ClientSession` API and nothing else.

It runs when `upstream.client: aiohttp` is chosen. The direct client (`aiohttp-direct`) also
sends its streamed request bodies through it. It keeps the promises every upstream
client keeps (DESIGN 10):

- aiohttp's exceptions become `UpstreamConnectError`, `UpstreamTimeout` or
  `UpstreamBadResponse`, from `send()` before the head and from `chunks()` after it (where the
  request path counts them as `mid_body`);
- the client's own headers are forwarded and none are invented (no User-Agent, Accept,
  Accept-Encoding or Content-Type); bodies are relayed undecoded;
- a streamed request body that ends early (over `max_body_bytes`, or its client gone) raises
  inside aiohttp's body writer, and aiohttp drops that connection: the upstream never sees a
  complete-looking request;
- an idempotent request (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) that meets a pooled
  connection the upstream has closed is sent once more on a new connection; a POST is not, as
  it may have been acted on (ClientSession's own rule, RFC 9112 9.3.1);
- aiohttp writes header strings as UTF-8, while the gateway holds each header as the latin-1
  reading of the bytes that arrived. Bytes that HTTP allows (obs-text, 0x80-0xFF) and that form
  UTF-8 are therefore forwarded byte for byte; other obs-text, which aiohttp cannot write, is
  refused with 400 (`UnsendableRequest`), never altered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
from yarl import URL

from gateway.dataplane.upstream.base import Body, Origin
from gateway.errors import (
    UnsendableRequest,
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamTimeout,
)

# What ClientSession raises from the wire, and what a read timeout raises.
FAILURES = (asyncio.TimeoutError, aiohttp.ClientError, OSError)
# What ClientSession raises for an answer that is not HTTP or breaks its own framing (a bad
# status line, a body shorter than its Content-Length, a bad chunk): the upstream answered,
# badly.
GARBLED = (aiohttp.ClientPayloadError, aiohttp.ClientResponseError)
# Headers ClientSession would add on the client's behalf; the client's own are forwarded.
NOT_INVENTED = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def new_connector(max_connections: int) -> aiohttp.TCPConnector:
    """One pool for every HTTP/1.1 upstream, `max_connections` in all."""
    return aiohttp.TCPConnector(
        limit=max_connections, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True
    )


class SessionResponse:
    """An upstream answer read through `aiohttp.ClientResponse`."""

    __slots__ = ("_response", "headers", "on_close", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = list(response.raw_headers)
        # Called once, by the first aclose(): a client that shares the pool counts with it.
        self.on_close: Callable[[], None] | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except FAILURES as exc:
            raise translate(exc) from exc

    def complete_body(self) -> bytes | None:
        content = self._response.content
        if content.is_eof() and content.exception() is None:
            return content.read_nowait()
        return None

    async def aclose(self) -> None:
        # Back to the pool when the body was read to its end; closed otherwise, as the rest
        # of it is still on the wire.
        self._response.release()
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()


class AiohttpClient:
    """One `aiohttp.ClientSession` for every HTTP/1.1 upstream.

    `connector` lets another client share its pool (the direct client does); the session
    owns it either way and closes it in `aclose()`.
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        connector: aiohttp.TCPConnector | None = None,
    ) -> None:
        self.connector = connector or new_connector(max_connections)
        # sock_read: each wait for more of the answer, head or body, gets the read timeout.
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=self.connector,
            timeout=self.timeout,
            auto_decompress=False,
            skip_auto_headers=NOT_INVENTED,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def send(
        self, method: str, origin: Origin, target: str, headers: list[tuple[str, str]], body: Body
    ) -> SessionResponse:
        url = URL(origin.url + target, encoded=True)  # Origin.url brackets an IPv6 host
        written = as_written(headers)
        try:
            response = await self._session.request(
                method, url, headers=written, data=body, allow_redirects=False, compress=None
            )
        except FAILURES as exc:
            raise translate(exc) from exc
        except ValueError as exc:  # a header aiohttp will not write (a line break in it)
            raise UnsendableRequest(f"request refused by the client library: {exc}") from exc
        return SessionResponse(response)

    async def aclose(self) -> None:
        await self._session.close()  # and the connector it owns


def as_written(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`headers` as strings whose UTF-8 (what aiohttp writes) is the bytes that arrived.

    Each string is the latin-1 reading of the bytes; ASCII reads the same either way, and
    other bytes are re-read as UTF-8. Bytes that are not UTF-8 cannot go through aiohttp
    unchanged, so the request is refused rather than sent altered.
    """
    if all(name.isascii() and value.isascii() for name, value in headers):
        return headers
    try:
        return [(_as_utf8(name), _as_utf8(value)) for name, value in headers]
    except UnicodeDecodeError as exc:
        raise UnsendableRequest(
            "a header holds bytes outside ASCII that are not UTF-8, which this upstream "
            "client cannot forward unchanged"
        ) from exc


def _as_utf8(text: str) -> str:
    return text if text.isascii() else text.encode("latin-1").decode("utf-8")


def translate(exc: BaseException) -> UpstreamConnectError | UpstreamBadResponse | UpstreamTimeout:
    """The gateway's error for what aiohttp raised, by the kinds the metrics count."""
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(f"upstream timed out: {exc.__class__.__name__}")
    if isinstance(exc, GARBLED):
        return UpstreamBadResponse(f"upstream answer unreadable: {exc.__class__.__name__}: {exc}")
    return UpstreamConnectError(f"upstream failed: {exc.__class__.__name__}: {exc}")
