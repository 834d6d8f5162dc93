"""Rollout routes of the admin API: a flag's status, and the operator's actions on it.

`GET /admin/flags/{key}/status` (viewer) and `POST /admin/flags/{key}/{rollback, promote,
pause, resume, restart}` (operator, body `{"reason": "..."}`, audited with the token's name).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin import ActionRequest, action_route, error_response, guarded
from gateway.auth import Authenticator, Principal
from gateway.errors import NotFoundError
from gateway.openapi import ROLLOUT_ACTIONS
from gateway.status import flag_status

if TYPE_CHECKING:
    from gateway.app import Gateway


def rollout_routes(gateway: Gateway, auth: Authenticator) -> list[Route]:
    async def status(request: Request, caller: Principal) -> Response:
        return JSONResponse(status_of(gateway, request.path_params["key"]))

    def act(action: str):  # type: ignore[no-untyped-def]
        async def handler(request: Request, req: ActionRequest) -> Response:
            if req.key not in gateway.router.by_key:
                raise NotFoundError(f"no flag {req.key!r}")
            try:
                await gateway.controller.act(
                    req.key, action, actor=req.caller.name, reason=req.reason
                )
            except ValueError as exc:
                return error_response(409, "illegal_transition", str(exc))
            return JSONResponse(status_of(gateway, req.key))

        return handler

    routes = [Route("/admin/flags/{key}/status", guarded(auth, "viewer", status), methods=["GET"])]
    routes += [action_route(auth, action, act(action)) for action in ROLLOUT_ACTIONS]
    return routes


def status_of(gateway: Gateway, key: str) -> dict[str, object]:
    flag = gateway.router.by_key.get(key)
    if flag is None:
        raise NotFoundError(f"no flag {key!r}")
    controller = gateway.controller
    return flag_status(
        flag,
        controller.rollouts.get(key),
        time.time(),
        pending_rollback=key in controller.pending_rollbacks,
        shadows=gateway.mirror.report(flag),
    )
