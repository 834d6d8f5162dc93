"""Chooses the client for each upstream: httpx for HTTP/2 upstreams, else the configured one
(`upstream.client`, loaded through the seam in `upstream/choice.py`)."""

from __future__ import annotations

from gateway.dataplane.upstream.base import Body, Origin, UpstreamClient, UpstreamResponse
from gateway.dataplane.upstream.choice import ClientChoice, choose_client
from gateway.dataplane.upstream.httpx_client import HttpxClient
from gateway.settings import ClientKind
from gateway.settings import Upstream as UpstreamSettings


class UpstreamPool:
    """The app's upstream clients, created in the lifespan and closed with it.

    The HTTP/1.1 client is chosen once, when the pool is made (`choice`, or the settings'
    `upstream.client` through `choose_client`); `client_impl` names the one that runs.
    """

    def __init__(self, settings: UpstreamSettings, *, choice: ClientChoice | None = None) -> None:
        self._settings = settings
        self._choice = choice or choose_client(settings.client)
        self._http1: UpstreamClient | None = None
        self._http2: HttpxClient | None = None

    @property
    def client_impl(self) -> ClientKind:
        return self._choice.impl

    def client_for(self, origin: Origin) -> UpstreamClient:
        if origin.http2:
            if self._http2 is None:
                self._http2 = self._httpx(http2=True)
            return self._http2
        if self._http1 is None:
            s = self._settings
            self._http1 = self._choice.make(
                connect_timeout_s=s.connect_timeout_s,
                read_timeout_s=s.read_timeout_s,
                max_connections=s.max_connections,
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
