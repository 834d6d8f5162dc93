"""CPU per request of a proxy's ASGI app alone: no server, no client socket, real upstream.

`make bench` measures whole processes under wrk, where uvicorn, the kernel and the neighbours
move every figure. This drives an app's `__call__` directly with ASGI dicts, 8 requests at a
time, against a real upstream over loopback (nginx, as in the bench), and reports the
process's CPU time per request: the app and its upstream client, nothing else. Use it to
see what a change to the request path costs before running the whole bench; `--profile`
adds a cProfile listing.

    .venv/bin/python bench/inprocess.py bare gateway gateway-all --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from processes import Fleet, free_port
from rows import UPSTREAMS, Spot, bench_flag

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
KINDS = ("bare", "gateway", "gateway-all", "gateway-aiohttp", "gateway-all-aiohttp")
# A `-aiohttp` kind runs the stock `ClientSession` client (`upstream.client: aiohttp`).
SETTLE_S = 6.0  # the gateway imports scipy in a thread after start-up when it has shadows


async def drive(app: App, requests: int, *, concurrency: int = 8) -> None:
    """`requests` GETs of `/`, each with `x-user-id: user-<n>` (n = 1..1000, as users.lua)."""
    users = [f"user-{n}".encode() for n in range(1, 1001)]

    async def one(i: int) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": "/", "raw_path": b"/",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
            "headers": [(b"host", b"127.0.0.1:8000"), (b"x-user-id", users[i % 1000])],
        }  # fmt: skip
        done = asyncio.Event()
        asked = False
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            elif not message.get("more_body"):
                done.set()

        await app(scope, receive, send)
        if statuses != [200]:
            raise SystemExit(f"request {i}: status {statuses}")

    async def worker(first: int) -> None:
        for i in range(first, requests, concurrency):
            await one(i)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))


async def measure(kind: str, upstreams: dict[str, str], workdir: Path, args: Any) -> None:
    if kind == "bare":
        from bare_proxy import BareProxy

        bare = BareProxy(upstreams["stable"])
        started: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await started.put({"type": "lifespan.startup"})

        async def ignore(message: dict[str, Any]) -> None:
            pass

        lifespan = asyncio.create_task(bare.lifespan(started.get, ignore))
        await asyncio.sleep(0.1)
        app: App = bare
        stop = None
    else:
        from gateway.app import create_app
        from gateway.settings import load_settings

        spot = Spot(0, upstreams["stable"], workdir, upstreams["canary"], upstreams["shadow"])
        flags = workdir / f"{kind}.json"
        features = kind.startswith("gateway-all")
        flags.write_text(json.dumps({"flags": [bench_flag(spot, features=features)]}))
        overrides = {"store.flags_file": str(flags), "listen.host": "127.0.0.1"}
        if kind.endswith("-aiohttp"):
            overrides["upstream.client"] = "aiohttp"
        gateway = create_app(load_settings(None, env={}, overrides=overrides))
        await gateway.start()
        await asyncio.sleep(SETTLE_S)
        app, stop = gateway.data_app, gateway.stop
    await drive(app, 2000)  # warm-up: connections, caches
    profile = cProfile.Profile() if args.profile else None
    cpu, wall = time.process_time(), time.perf_counter()
    if profile is not None:
        profile.enable()
    await drive(app, args.requests)
    if profile is not None:
        profile.disable()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        f"{kind}: {args.requests} requests, CPU {cpu / args.requests * 1e6:.1f} us/request"
        f" (wall {wall / args.requests * 1e6:.1f} us){' under cProfile' if profile else ''}"
    )
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    if stop is not None:
        await stop()
    else:
        await started.put({"type": "lifespan.shutdown"})
        await lifespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kinds", nargs="+", choices=KINDS)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true", help="print a cProfile listing too")
    args = parser.parse_args()
    upstream = UPSTREAMS[0]  # nginx
    if why := upstream.needs():
        raise SystemExit(why)
    with tempfile.TemporaryDirectory(prefix="inprocess-") as tmp, Fleet(Path(tmp)) as fleet:
        upstreams = {}
        for role in ("stable", "canary", "shadow"):
            port = free_port()
            assert upstream.launch is not None
            fleet.start(f"upstream-{role}", upstream.launch(Spot(port, "", Path(tmp))), port=port)
            upstreams[role] = f"http://127.0.0.1:{port}"
        for kind in args.kinds:  # one process, one kind after another
            uvloop.run(measure(kind, upstreams, Path(tmp), args))


if __name__ == "__main__":
    sys.exit(main())
