"""The httptools client over random sequences of answers on real loopback connections.

A scripted upstream (asyncio's server) answers each request with the next answer of a
sequence Hypothesis draws: every framing HTTP/1.1 has (Content-Length, chunked, the
connection's close, none for HEAD and 204), interim answers first, `Connection: close`,
answers cut short and answers that are not HTTP. Sent one after another through one
`HttptoolsClient`, each request must get its own answer's body (or the error its answer
earns), and the client must keep a connection exactly when the answer allows it: the
upstream counts the connections it accepted. The same upstream behind TLS checks that the
client verifies an https upstream's certificate.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dataplane.upstream.base import Origin
from gateway.dataplane.upstream.httptools_client import HttptoolsClient
from gateway.errors import UpstreamBadResponse, UpstreamConnectError, UpstreamError


@dataclass(frozen=True)
class Answer:
    kind: str  # length | chunked | eof | head | no_content | interim | short | garbage
    body: bytes = b""
    close: bool = False  # says `Connection: close`

    @property
    def method(self) -> str:
        return "HEAD" if self.kind == "head" else "GET"

    @property
    def closes(self) -> bool:
        """Whether the upstream closes the connection after this answer. After one that only
        says `Connection: close` it does not: the client must close it, not reuse it."""
        return self.kind in ("eof", "short", "garbage")

    @property
    def ends_connection(self) -> bool:
        return self.close or self.closes

    @property
    def fails(self) -> bool:
        return self.kind in ("short", "garbage")

    @property
    def expected_body(self) -> bytes:
        return b"" if self.kind in ("head", "no_content") else self.body

    def wire(self) -> bytes:
        close = b"Connection: close\r\n" if self.close else b""
        body = self.body
        if self.kind == "length":
            return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (close, len(body), body)
        if self.kind == "interim":
            interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            return interim + Answer("length", body, self.close).wire()
        if self.kind == "chunked":
            pieces = [body[i : i + 3] for i in range(0, len(body), 3)]
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
            head = b"HTTP/1.1 200 OK\r\n%sTransfer-Encoding: chunked\r\n\r\n" % close
            return head + chunks + b"0\r\n\r\n"
        if self.kind == "eof":
            return b"HTTP/1.1 200 OK\r\n\r\n" + body
        if self.kind == "head":  # the length the body would have: none follows
            return b"HTTP/1.1 200 OK\r\n%sContent-Length: 7\r\n\r\n" % close
        if self.kind == "no_content":
            return b"HTTP/1.1 204 No Content\r\n%s\r\n" % close
        if self.kind == "short":
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body) + 5, body)
        assert self.kind == "garbage"
        return b"SSH-2.0-OpenSSH_9.6\r\n\r\n"


bodies = st.binary(min_size=0, max_size=40)
answers = st.one_of(
    st.builds(Answer, st.sampled_from(["length", "chunked", "interim"]), bodies, st.booleans()),
    st.builds(Answer, st.just("eof"), bodies),
    st.builds(Answer, st.sampled_from(["head", "no_content"]), st.just(b""), st.booleans()),
    st.builds(Answer, st.just("short"), bodies),
    st.builds(Answer, st.just("garbage")),
)


class ScriptedUpstream:
    def __init__(self) -> None:
        self.plan: deque[Answer] = deque()
        self.accepted = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                answer = self.plan.popleft()
                writer.write(answer.wire())
                await writer.drain()
                if answer.closes:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


async def _read(client: HttptoolsClient, origin: Origin, answer: Answer) -> bytes:
    response = await client.send(answer.method, origin, "/x", [("x-a", "b")], None)
    try:
        body = response.complete_body()
        if body is None:
            body = b"".join([chunk async for chunk in response.chunks()])
        assert response.status == (204 if answer.kind == "no_content" else 200)
        return body
    finally:
        await response.aclose()


async def _run(sequence: list[Answer]) -> None:
    upstream = ScriptedUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    origin = Origin.parse(f"http://127.0.0.1:{port}")
    client = HttptoolsClient(connect_timeout_s=5.0, read_timeout_s=10.0, max_connections=4)
    try:
        for answer in sequence:
            upstream.plan.append(answer)
            if answer.fails:
                with pytest.raises(UpstreamBadResponse):
                    await _read(client, origin, answer)
            else:
                assert await _read(client, origin, answer) == answer.expected_body, answer
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert len(upstream.requests) == len(sequence)
    assert not upstream.plan
    # A new connection after each answer that ends its connection (by closing it or saying it
    # will), and only then. (Should the client not have seen the close yet, the GET or HEAD
    # that meets it is sent again on one new connection: the same count.)
    closing = sum(1 for answer in sequence[:-1] if answer.ends_connection)
    assert upstream.accepted == 1 + closing, (upstream.accepted, sequence)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(answers, min_size=1, max_size=12))
def test_each_request_gets_its_own_answer_and_connections_are_kept_exactly_when_allowed(
    sequence: list[Answer],
) -> None:
    asyncio.run(_run(sequence))


def test_an_error_answer_is_an_upstream_error_not_a_library_one() -> None:
    """A garbled answer is `UpstreamBadResponse`, a subclass of the gateway's own error."""
    assert issubclass(UpstreamBadResponse, UpstreamError)
    asyncio.run(_run([Answer("garbage"), Answer("length", b"after")]))


async def _https_exchange(server_context: ssl.SSLContext, requests: int) -> tuple[list[bytes], int]:
    upstream = ScriptedUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    origin = Origin.parse(f"https://127.0.0.1:{port}")
    client = HttptoolsClient(connect_timeout_s=5.0, read_timeout_s=10.0, max_connections=4)
    bodies = []
    try:
        for n in range(requests):
            answer = Answer("length", b"tls %d" % n)
            upstream.plan.append(answer)
            bodies.append(await _read(client, origin, answer))
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    return bodies, upstream.accepted


def _server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def test_an_https_upstream_is_verified_against_the_trusted_cas_and_kept_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client verifies an https upstream's certificate and host against the system's
    trusted CAs (here `SSL_CERT_FILE`, which OpenSSL reads), and keeps the connection."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    bodies, accepted = asyncio.run(_https_exchange(_server_context(ca), 3))
    assert bodies == [b"tls 0", b"tls 1", b"tls 2"]
    assert accepted == 1


def test_an_https_upstream_with_an_untrusted_certificate_is_a_connect_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trusted, other = trustme.CA(), trustme.CA()
    trusted.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(_https_exchange(_server_context(other), 1))
