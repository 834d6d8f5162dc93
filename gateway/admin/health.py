"""Liveness, readiness and the Prometheus endpoint on the admin port."""

from __future__ import annotations

import asyncio
import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin.ports import HealthGateway


def health_routes(gateway: HealthGateway) -> list[Route]:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        state = gateway.readiness()
        body = {
            "ready": state.ready,
            "flags": state.flags,
            "store_up": state.store_up,
            "snapshot_problems": [
                {"flag": key, "reason": why} for key, why in state.snapshot_problems.items()
            ],
            "in_flight": state.in_flight,
            "mirrors_in_flight": state.mirrors_in_flight,
            "tasks": len(asyncio.all_tasks()),  # for leak checks: back to baseline when idle
            "pid": os.getpid(),
        }
        return JSONResponse(body, status_code=200 if state.ready else 503)

    async def metrics(request: Request) -> Response:
        gateway.observe_store()
        return Response(generate_latest(exposed), media_type=CONTENT_TYPE_LATEST)

    exposed = gateway.registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several workers: sum (or max/min) every worker's values from the shared directory.
        exposed = CollectorRegistry()
        MultiProcessCollector(exposed)  # type: ignore[no-untyped-call]  # untyped upstream

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
