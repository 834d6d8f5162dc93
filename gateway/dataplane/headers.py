"""Header handling between the client and the upstream, both ways, in one place.

A proxy must drop Connection, every header that Connection names, Keep-Alive, Proxy-*, TE,
Trailer, Transfer-Encoding and Upgrade: they describe one connection, not the message
(RFC 9110 7.6.1). On the way in, Content-Length and Host are dropped too: the client library
frames the forwarded body and names the upstream's host itself. Each direction is one pass
over the headers: this runs on every request (`name[:6] == b"proxy-"` rather than
`startswith`, whose argument parsing costs twice as much, ~6 times per request).
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
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
}
# The body is relayed byte for byte (no decompression), so the upstream's Content-Length holds.
_RESPONSE_DROP = HOP_BY_HOP | {b"x-gateway-variant", b"x-request-id"}


EVENT_STREAM = b"text/event-stream"

# Connection values that name no header beyond those dropped anyway (most upstreams send one).
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})


def _named(value: bytes, named: set[bytes] | None) -> set[bytes] | None:
    """Add the header names a Connection value lists (lower-case) to `named`."""
    if value.lower() in _PLAIN_CONNECTION:
        return named
    named = set() if named is None else named
    named.update(t for t in (t.strip().lower() for t in value.split(b",")) if t)
    return named


def forwarded_request_headers(
    scope_headers: Iterable[tuple[bytes, bytes]],
    *,
    client_ip: str,
    scheme: str,
    request_id: str,
) -> list[tuple[str, str]]:
    """Client headers to forward (ASGI gives lower-case names), as str pairs for the client,
    followed by X-Forwarded-For (appended to), -Proto, -Host and X-Request-Id."""
    out: list[tuple[str, str]] = []
    named: set[bytes] | None = None
    host = None
    prior_for: list[str] = []  # several X-Forwarded-For fields are one comma-separated list
    for name, value in scope_headers:
        if name in _REQUEST_DROP or name[:6] == b"proxy-":
            if name == b"connection":
                named = _named(value, named)
            elif name == b"host" and host is None:  # two are refused before this runs
                host = value
            elif name == b"x-forwarded-for":
                prior_for.append(value.decode("latin-1"))
            continue
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    if named:
        out = [(n, v) for n, v in out if n.encode("latin-1") not in named]
    prior_for.append(client_ip)
    out.append(("x-forwarded-for", ", ".join(prior_for)))
    out.append(("x-forwarded-proto", scheme))
    if host is not None:
        out.append(("x-forwarded-host", host.decode("latin-1")))
    out.append(("x-request-id", request_id))
    return out


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Upstream response headers to pass back, names lower-cased as ASGI wants them, and
    whether they announce an event stream (a first Content-Type of `text/event-stream`): the
    one pass over the headers answers both."""
    out: list[tuple[bytes, bytes]] = []
    named: set[bytes] | None = None
    content_type: bytes | None = None
    for name, value in raw:
        name = name.lower()
        if name in _RESPONSE_DROP or name[:6] == b"proxy-":
            if name == b"connection":
                named = _named(value, named)
            continue
        if name == b"content-type" and content_type is None:
            content_type = value
        out.append((name, value))
    if named:
        out = [(n, v) for n, v in out if n not in named]
        return out, is_event_stream(out)
    return out, content_type is not None and content_type[:17].lower() == EVENT_STREAM


def is_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether (lower-case) response headers announce an event stream."""
    for name, value in headers:
        if name == b"content-type":
            return value[:17].lower() == EVENT_STREAM
    return False
