"""The fastest plain-Python proxy we know: raw ASGI in front of one aiohttp ClientSession.

Forwards method, path, query, headers (minus hop-by-hop) and the streamed body; streams the
response back. No routing, no Request/Response objects: the floor a Python gateway can reach.
Run: `python bench/bare_proxy.py --upstream http://127.0.0.1:9001 --port 8002`.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import uvicorn
from yarl import URL

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
# aiohttp would add these when the client did not send them; a proxy must not invent headers.
NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding")


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.forward(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=1000),
                    auto_decompress=False,
                    skip_auto_headers=NO_AUTO_HEADERS,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.session is not None
        target = scope.get("raw_path") or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k not in HOP_BY_HOP
        ]
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        started = False
        try:
            async with self.session.request(
                scope["method"],
                URL(self.upstream + target.decode("latin-1"), encoded=True),
                headers=headers,
                data=_body(receive) if has_body else None,
                allow_redirects=False,
            ) as response:
                response_headers = [
                    (k.lower(), v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP
                ]
                start = {"type": "http.response.start", "status": response.status}
                await send({**start, "headers": response_headers})
                started = True
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except aiohttp.ClientError:
            if started:
                raise  # too late for a 502: let the server cut the connection
            body = b'{"error": "bad gateway"}'
            length = (b"content-length", str(len(body)).encode())
            await send({"type": "http.response.start", "status": 502, "headers": [length]})
            await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        yield message.get("body", b"")
        more = message.get("more_body", False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        BareProxy(args.upstream),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
