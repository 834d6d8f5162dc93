"""The pooled upstream clients over random sequences of requests to two origins, at a small
`max_connections`.

Requests go one after another or overlap (an answer held unread while the next goes out), to
either of two real loopback upstreams, with bodies in memory or streamed. The direct client
keeps the connections it has read answers on for its own next requests, outside aiohttp's pool,
and sends streamed bodies through `ClientSession` on that pool: whatever the order, a request
sent while fewer than `max_connections` answers are held must be served (no request may wait
for a connection kept idle elsewhere), by its own origin, once, and closing the client must
close every connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dataplane.upstream.base import Origin, UpstreamClient, UpstreamResponse
from gateway.dataplane.upstream.choice import choose_client
from gateway.settings import ClientKind

LIMIT = 2
POOLED: list[ClientKind] = ["aiohttp-direct", "httptools", "aiohttp", "httpx"]


@dataclass(frozen=True)
class Send:
    origin: int  # 0 or 1
    body: str  # none | bytes | streamed
    hold: bool  # the answer stays unread until a later step closes it


@dataclass(frozen=True)
class Close:
    which: int  # of the answers held, modulo their count


sends = st.builds(
    Send, st.integers(0, 1), st.sampled_from(["none", "bytes", "streamed"]), st.booleans()
)
steps = st.lists(
    st.one_of(sends, sends, st.builds(Close, st.integers(0, 7))), min_size=1, max_size=14
)


@dataclass
class Upstream:
    """Answers every request with its own name and the request's number; counts the
    connections open now."""

    name: bytes
    requests: list[bytes] = field(default_factory=list)
    open: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (
                        line.partition(b":") for line in head.split(b"\r\n")[1:] if line
                    )
                }
                if fields.get(b"transfer-encoding") == b"chunked":
                    while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                        await reader.readexactly(size + 2)
                    await reader.readuntil(b"\r\n")
                else:
                    await reader.readexactly(int(fields.get(b"content-length", b"0")))
                self.requests.append(head.split(b"\r\n", 1)[0])
                body = b"%s %d" % (self.name, len(self.requests))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self.open -= 1
            writer.close()


async def _streamed() -> AsyncIterator[bytes]:
    for _ in range(3):
        yield b"x" * 1000
        await asyncio.sleep(0)


async def _read(response: UpstreamResponse) -> bytes:
    try:
        body = response.complete_body()
        if body is None:
            body = b"".join([chunk async for chunk in response.chunks()])
        return body
    finally:
        await response.aclose()


async def _run(kind: ClientKind, sequence: list[Send | Close]) -> None:
    upstreams = [Upstream(b"a"), Upstream(b"b")]
    servers = [await asyncio.start_server(up.handle, "127.0.0.1", 0) for up in upstreams]
    origins = [Origin.parse(f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}") for s in servers]
    client: UpstreamClient = choose_client(kind).make(
        connect_timeout_s=2.0, read_timeout_s=10.0, max_connections=LIMIT
    )
    held: list[tuple[UpstreamResponse, int, int]] = []  # answer, origin, its number there
    sent = [0, 0]
    try:
        for step in sequence:
            if isinstance(step, Close):
                if held:
                    response, origin, number = held.pop(step.which % len(held))
                    assert await _read(response) == b"%s %d" % (upstreams[origin].name, number)
                continue
            while len(held) >= LIMIT:  # a request must be servable: fewer than LIMIT held
                response, origin, number = held.pop(0)
                assert await _read(response) == b"%s %d" % (upstreams[origin].name, number)
            body = {"none": None, "bytes": b"{}", "streamed": _streamed()}[step.body]
            method = "GET" if body is None else "POST"
            # Waiting on a connection nobody gives back ends in the connect timeout's error.
            response = await asyncio.wait_for(
                client.send(method, origins[step.origin], "/x", [("x-a", "b")], body), 30
            )
            sent[step.origin] += 1
            assert response.status == 200
            if step.hold:
                held.append((response, step.origin, sent[step.origin]))
            else:
                expected = b"%s %d" % (upstreams[step.origin].name, sent[step.origin])
                assert await _read(response) == expected
        for response, origin, number in held:
            assert await _read(response) == b"%s %d" % (upstreams[origin].name, number)
        held.clear()
    finally:
        for response, _, _ in held:
            await response.aclose()
        await client.aclose()
        for server in servers:
            server.close()
    # Each request reached its own origin once.
    assert [len(up.requests) for up in upstreams] == sent
    # No connection outlives the client.
    for _ in range(200):
        if not any(up.open for up in upstreams):
            break
        await asyncio.sleep(0.05)
    assert [up.open for up in upstreams] == [0, 0]


@pytest.mark.parametrize("kind", POOLED)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=steps)
def test_every_request_is_served_by_its_origin_whatever_the_order(
    kind: ClientKind, sequence: list[Send | Close]
) -> None:
    asyncio.run(_run(kind, sequence))


# Sequences that need room made: the limit is full of one answer held and a connection kept
# idle, and the next request wants another connection.
ROOM_NEEDED = {
    # kept for `b`, held on `a`; then a streamed request to `a`, one with a body to `b`
    "streamed-beside-kept": [
        Send(1, "none", hold=False),
        Send(0, "none", hold=True),
        Send(0, "streamed", hold=False),
        Send(1, "bytes", hold=False),
        Send(0, "none", hold=False),
    ],
    # held and kept on `a`; then a request to `b`
    "direct-beside-kept": [
        Send(0, "none", hold=True),
        Send(0, "none", hold=False),
        Send(1, "none", hold=False),
        Send(0, "bytes", hold=False),
    ],
}


@pytest.mark.parametrize("kind", POOLED)
@pytest.mark.parametrize("name", sorted(ROOM_NEEDED))
def test_a_request_is_served_while_the_limit_is_kept_idle_for_another_origin(
    kind: ClientKind, name: str
) -> None:
    asyncio.run(_run(kind, ROOM_NEEDED[name]))
