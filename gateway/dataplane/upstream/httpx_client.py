"""The httpx upstream client: HTTP/2 model servers, and users who prefer httpx."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from gateway.dataplane.upstream.base import Body, Origin
from gateway.errors import (
    UnsendableRequest,
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)


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
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc
        except (ValueError, UnicodeError) as exc:  # a header httpx will not write
            raise UnsendableRequest(f"request refused by the client library: {exc}") from exc
        return HttpxResponse(response)

    async def aclose(self) -> None:
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
