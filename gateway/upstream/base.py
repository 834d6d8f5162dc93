"""The upstream interface: what the request path needs from an HTTP client, and no more."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

Body = bytes | AsyncIterable[bytes] | None


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an arm's requests go: scheme, host and port from a validated flag document.

    The request path only ever appends the client's path and query to an Origin, so no
    request can make the gateway call a host that no flag names.
    """

    scheme: str
    host: str
    port: int
    base_path: str = ""
    http2: bool = False

    @classmethod
    def parse(cls, url: str, *, http2: bool = False) -> Origin:
        parts = urlsplit(url)
        port = parts.port or _default_port(parts.scheme)
        host = parts.hostname or ""
        return cls(parts.scheme, host, port, parts.path.rstrip("/"), http2)

    @property
    def url_host(self) -> str:
        """The host as a URL or a Host header writes it: an IPv6 address in brackets."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def authority(self) -> str:
        """The Host header's value: the host, and the port unless it is the scheme's default."""
        default = self.port == _default_port(self.scheme)
        return self.url_host if default else f"{self.url_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.url_host}:{self.port}{self.base_path}"


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


class UpstreamResponse(Protocol):
    status: int

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]:
        """Raw (name, value) pairs as the upstream sent them."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, undecoded."""
        ...

    def complete_body(self) -> bytes | None:
        """The whole body if it has already arrived (small bodies mostly do, with the head);
        else None, and `chunks()` gives it. Saves the stream's machinery on most requests."""
        ...

    async def aclose(self) -> None:
        """Give the connection back (or drop it if the body was not read to the end)."""
        ...


class UpstreamClient(Protocol):
    async def send(
        self, method: str, origin: Origin, target: str, headers: list[tuple[str, str]], body: Body
    ) -> UpstreamResponse:
        """Send one request; `target` is the path and query exactly as the client sent them.

        Raises `UpstreamConnectError` or `UpstreamTimeout`; never a library exception.
        """
        ...

    async def aclose(self) -> None: ...
