"""Chooses the client for each upstream: httpx for HTTP/2 upstreams, else the configured one."""

from __future__ import annotations

from gateway.settings import Upstream as UpstreamSettings
from gateway.upstream.aiohttp_client import AiohttpClient
from gateway.upstream.base import Body, Origin, UpstreamClient, UpstreamResponse
from gateway.upstream.httpx_client import HttpxClient


class UpstreamPool:
    """The app's upstream clients, created in the lifespan and closed with it."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self._http1: UpstreamClient | None = None
        self._http2: HttpxClient | None = None

    def client_for(self, origin: Origin) -> UpstreamClient:
        if origin.http2:
            if self._http2 is None:
                self._http2 = self._httpx(http2=True)
            return self._http2
        if self._http1 is None:
            s = self._settings
            self._http1 = (
                self._httpx(http2=False)
                if s.client == "httpx"
                else AiohttpClient(
                    connect_timeout_s=s.connect_timeout_s,
                    read_timeout_s=s.read_timeout_s,
                    max_connections=s.max_connections,
                )
            )
        return self._http1

    async def send(
        self, method: str, origin: Origin, target: str, headers: list[tuple[str, str]], body: Body
    ) -> UpstreamResponse:
        return await self.client_for(origin).send(method, origin, target, headers, body)

    def _httpx(self, *, http2: bool) -> HttpxClient:
        s = self._settings
        return HttpxClient(
            connect_timeout_s=s.connect_timeout_s,
            read_timeout_s=s.read_timeout_s,
            max_connections=s.max_connections,
            http2=http2,
        )

    async def aclose(self) -> None:
        for client in (self._http1, self._http2):
            if client is not None:
                await client.aclose()
        self._http1 = self._http2 = None
