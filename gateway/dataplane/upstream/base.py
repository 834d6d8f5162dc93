"""The upstream interface: what the request path needs from an HTTP client, and no more.

Every implementation (the direct aiohttp client, httptools, the stock aiohttp client, httpx)
promises the same (DESIGN 10), and the data-plane suites check each of them against it:
- errors are the gateway's own (`gateway.errors`): `UpstreamConnectError`, `UpstreamTimeout`,
  `UpstreamBadResponse` or `UnsendableRequest` from `send()`; the first three from `chunks()`
  too, once the head is in (the request path counts those as `mid_body`);
- the request goes out with the client's own headers and nothing invented, and the answer's
  body comes back undecoded;
- header bytes outside ASCII are forwarded unchanged or refused with `UnsendableRequest`,
  never altered;
- a streamed request body that raises stops the request without its end, and the connection
  is dropped: the upstream never sees a complete-looking request;
- no request is sent twice, except an idempotent one that met a pooled connection the
  upstream had closed (aiohttp's rule; httpx sends every request once).
"""

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

    # A response may also offer `push_chunks(on_chunk, drain)` (the httptools and the direct
    # aiohttp clients' do): the body handed to `on_chunk` as it arrives rather than pulled through
    # `chunks()`, reading paused while `on_chunk` says the consumer is full, until `drain()`
    # returns. Raises what `chunks()` raises. The event-stream relay uses it where present.


class UpstreamClient(Protocol):
    async def send(
        self, method: str, origin: Origin, target: str, headers: list[tuple[str, str]], body: Body
    ) -> UpstreamResponse:
        """Send one request; `target` is the path and query exactly as the client sent them.

        Returns once the response head is in. Raises an `UpstreamError`; never a library
        exception.
        """
        ...

    async def aclose(self) -> None: ...
