"""Every upstream client against a real model server: a request cancelled at any moment (its
client left) leaves no connection behind.

httpcore 1.0, under the httpx client, strands the connection of a request cancelled between
connecting and sending (gateway/dataplane/fast/httpx_pool.py). Cancelling after every number of
loop turns from 0 up meets that moment, and every other one, in every run.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import httpcore
import httpx
import pytest
import uvloop
from sockets import tcp_sockets

from gateway.dataplane.fast.httpx_pool import connection_pool
from gateway.dataplane.upstream.base import Origin, UpstreamClient
from gateway.dataplane.upstream.choice import choose_client

TURNS = 30  # cancel after 0..29 turns of the loop: the connect, the send and the wait in between
REPEATS = 3
DEADLINE_S = 60.0  # generous: the repair waits STRANDED_AFTER_S after the last cancellation


def _held_to(port: int) -> list[str]:
    """This process's open connections to the model server's port."""
    return [str(s) for s in tcp_sockets(os.getpid()) if s.peer_port == port]


async def _cancel_at_every_turn(client: UpstreamClient, origin: Origin) -> None:
    headers = [("host", origin.authority)]
    for turns in range(TURNS):
        for _ in range(REPEATS):
            task = asyncio.create_task(client.send("GET", origin, "/v1/x/_stall", headers, b""))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _until_none_held(port: int) -> list[str]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        held = _held_to(port)
        if not held or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("kind", ["aiohttp-direct", "httptools", "aiohttp", "httpx"])
def test_requests_cancelled_at_any_moment_leave_no_connection_behind(
    model_server: Callable[..., Any], kind: Any, loop: str
) -> None:
    upstream = model_server("v1")
    origin = Origin.parse(upstream.url)
    choice = choose_client(kind)
    assert choice.impl == kind

    async def run() -> tuple[list[str], int]:
        client = choice.make(connect_timeout_s=10, read_timeout_s=30, max_connections=100)
        try:
            await _cancel_at_every_turn(client, origin)
            held = await _until_none_held(origin.port)
            # The pool goes on serving: the stranded connections no longer take its slots.
            answer = await client.send(
                "POST", origin, "/v1/predict", [("host", origin.authority)], b'{"text": "ok"}'
            )
            await answer.aclose()
            return held, answer.status
        finally:
            await client.aclose()

    runner = asyncio.run if loop == "asyncio" else uvloop.run
    held, status = runner(run())
    assert held == [], f"connections left open by cancelled requests: {held}"
    assert status == 200


def test_the_pool_is_found_only_where_httpx_keeps_it() -> None:
    """The seam's stock fallback: a transport without httpcore's pool gets no repair."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    assert isinstance(connection_pool(httpx.AsyncClient()), httpcore.AsyncConnectionPool)
    assert connection_pool(httpx.AsyncClient(transport=httpx.ASGITransport(app=app))) is None
