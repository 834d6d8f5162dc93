"""Hop-by-hop header handling, in both directions, in one place (RFC 9110 7.6.1).

A proxy must drop Connection, every header that Connection names, Keep-Alive, Proxy-*, TE,
Trailer, Transfer-Encoding and Upgrade: they describe one connection, not the message.
On the way in, Content-Length and Host are dropped too: the client library frames the forwarded
body and names the upstream's host itself.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# X-Forwarded-Proto and -Host describe the gateway's own client connection: the gateway sets
# them, never passes on what a client claims (X-Forwarded-For is appended to instead).
_REQUEST_DROP = HOP_BY_HOP | {
    b"content-length",
    b"host",
    b"x-request-id",
    b"x-forwarded-proto",
    b"x-forwarded-host",
}
# The body is relayed byte for byte (no decompression), so the upstream's Content-Length holds.
_RESPONSE_DROP = HOP_BY_HOP | {b"x-gateway-variant", b"x-request-id"}


def connection_named(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in Connection (lower-case); usually empty."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(named)


def _is_dropped(name: bytes, drop: frozenset[bytes], named: frozenset[bytes]) -> bool:
    return name in drop or name in named or name.startswith(b"proxy-")


def request_headers(scope_headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Client headers to forward (ASGI gives lower-case names), as str pairs for the client."""
    named = connection_named(scope_headers)
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope_headers
        if not _is_dropped(name, _REQUEST_DROP, named)
    ]


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Upstream response headers to pass back; names lower-cased as ASGI wants them."""
    pairs = [(name.lower(), value) for name, value in raw]
    named = connection_named(pairs)
    return [(n, v) for n, v in pairs if not _is_dropped(n, _RESPONSE_DROP, named)]
