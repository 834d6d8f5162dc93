"""Header handling (gateway/dataplane/headers.py) against a plain restatement of RFC 9110 7.6.1."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.dataplane.headers import HOP_BY_HOP, forwarded_request_headers, response_headers

NAMES = [
    b"accept", b"x-user-id", b"cookie", b"x-foo", b"connection", b"keep-alive", b"te",
    b"upgrade", b"proxy-authorization", b"proxy-x", b"transfer-encoding", b"content-length",
    b"host", b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"x-gateway-variant", b"content-type",
]  # fmt: skip
VALUES = st.sampled_from([
    b"1", b"a b", b"keep-alive", b"close", b"x-foo", b"X-Foo, te", b" , ,x-user-id", b"Upgrade",
    b"text/event-stream", b"Text/Event-Stream; charset=utf-8", b"text/event",
    b"Connection, content-type",
])  # fmt: skip
HEADERS = st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=12)
REQUEST_SET_BY_GATEWAY = {
    b"content-length", b"host", b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host",
}  # fmt: skip


def connection_named(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named |= {t.strip().lower() for t in value.split(b",") if t.strip()}
    return named


def hop(name: bytes, named: set[bytes]) -> bool:
    return name in HOP_BY_HOP or name in named or name.startswith(b"proxy-")


@given(HEADERS, st.sampled_from(["127.0.0.1", "::1"]))
def test_request_headers_keep_end_to_end_fields_in_order_and_add_forwarding(
    headers: list[tuple[bytes, bytes]], client_ip: str
) -> None:
    out = forwarded_request_headers(headers, client_ip=client_ip, scheme="https", request_id="r")
    named = connection_named(headers)
    kept = [
        (n.decode(), v.decode())
        for n, v in headers
        if not hop(n, named) and n not in REQUEST_SET_BY_GATEWAY
    ]
    prior = [v.decode() for n, v in headers if n == b"x-forwarded-for"]
    host = next((v.decode() for n, v in headers if n == b"host"), None)
    added = [("x-forwarded-for", ", ".join([*prior, client_ip])), ("x-forwarded-proto", "https")]
    added += [("x-forwarded-host", host)] if host is not None else []
    assert out == [*kept, *added, ("x-request-id", "r")]


@given(HEADERS.map(lambda hs: [(n.title(), v) for n, v in hs]))
def test_response_headers_drop_hop_by_hop_and_lower_case_names(
    headers: list[tuple[bytes, bytes]],
) -> None:
    named = connection_named(headers)
    expected = [
        (n.lower(), v)
        for n, v in headers
        if not hop(n.lower(), named) and n.lower() not in {b"x-gateway-variant", b"x-request-id"}
    ]
    out, event_stream = response_headers(headers)
    assert out == expected
    # An event stream: the first Content-Type that is passed back says text/event-stream.
    content_type = next((v for n, v in expected if n == b"content-type"), None)
    assert event_stream == (
        content_type is not None and content_type.lower().startswith(b"text/event-stream")
    )


def test_connection_naming_an_end_to_end_header_drops_it_both_ways() -> None:
    request = [(b"connection", b"close, X-Secret"), (b"x-secret", b"1"), (b"accept", b"*/*")]
    out = forwarded_request_headers(request, client_ip="10.0.0.1", scheme="http", request_id="r")
    assert ("x-secret", "1") not in out and ("accept", "*/*") in out
    answer = [(b"X-Secret", b"1"), (b"Connection", b"X-Secret"), (b"Server", b"m")]
    assert response_headers(answer) == ([(b"server", b"m")], False)
