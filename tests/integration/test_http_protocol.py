"""The data plane's HTTP protocol (gateway/http_protocol.py) on a real uvicorn over loopback."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from conftest import UvicornHandle, raw_http

from gateway.http_protocol import GatewayHttpProtocol


def test_a_complete_response_leaves_before_the_task_goes_on(
    uvicorn_app: Callable[..., UvicornHandle],
) -> None:
    """The writes of a response are held to be sent together, but not past its last one: what
    the request's task does afterwards (metrics, the guard, returning its upstream connection)
    must not delay the client. The app below blocks its event loop after its last write until
    the client has the answer, so the answer must already be on the wire."""
    client_has_it, app_done = threading.Event(), threading.Event()
    in_time: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        head = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": b"ok"})
        in_time.append(client_has_it.wait(timeout=5))
        app_done.set()

    handle = uvicorn_app(app, http=GatewayHttpProtocol, lifespan="off")
    answers: list[tuple[int, bytes]] = []

    def client() -> None:
        answers.append(raw_http(handle.port, b"GET / HTTP/1.1\r\nhost: gw\r\n\r\n"))
        client_has_it.set()

    thread = threading.Thread(target=client)
    thread.start()
    thread.join(timeout=15)
    assert app_done.wait(timeout=15)
    assert answers == [(200, b"ok")]
    assert in_time == [True]


def test_head_and_body_written_in_separate_turns_both_arrive(
    uvicorn_app: Callable[..., UvicornHandle],
) -> None:
    """A streamed response: the head is held until the loop turns, later chunks follow."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one,", b"two,", b"three"):
            await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    handle = uvicorn_app(app, http=GatewayHttpProtocol, lifespan="off")
    status, body = raw_http(handle.port, b"GET / HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
    assert status == 200
    assert body == b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"
