"""Liveness, readiness and the Prometheus endpoint on the admin port."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from gateway.app import Gateway


def health_routes(gateway: Gateway) -> list[Route]:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready = gateway.ready and gateway.pool is not None
        body = {
            "ready": ready,
            "flags": len(gateway.router),
            "store_up": gateway.store.healthy,
            "in_flight": gateway.proxy.in_flight,
            "mirrors_in_flight": len(gateway.mirror.in_flight),
            "tasks": len(asyncio.all_tasks()),  # for leak checks: back to baseline when idle
            "pid": os.getpid(),
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        gateway.metrics.flag_store_up.set(1 if gateway.store.healthy else 0)
        if gateway.store.kind == "memory":
            gateway.last_sync = time.time()  # the embedded store is the snapshot: never stale
        if gateway.last_sync:
            gateway.metrics.flag_store_sync_age.set(time.time() - gateway.last_sync)
        return Response(generate_latest(exposed), media_type=CONTENT_TYPE_LATEST)

    exposed = gateway.registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several workers: sum (or max/min) every worker's values from the shared directory.
        exposed = CollectorRegistry()
        multiprocess.MultiProcessCollector(exposed)

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
