"""Rollout routes of the admin API: a flag's status, and the operator's actions on it.

`GET /admin/flags/{key}/status` (viewer) and `POST /admin/flags/{key}/{rollback, promote,
pause, resume, restart}` (operator, body `{"reason": "..."}`, audited with the token's name).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin.api import (
    Action,
    ActionRequest,
    action_route,
    guarded,
    maybe_stale,
    stale_field,
)
from gateway.admin.auth import Authenticator, Principal
from gateway.admin.openapi import ROLLOUT_ACTIONS
from gateway.admin.ports import AdminGateway
from gateway.control.status import flag_status
from gateway.errors import NotFoundError


def rollout_routes(gateway: AdminGateway, auth: Authenticator) -> list[Route]:
    async def status(request: Request, caller: Principal) -> Response:
        key = request.path_params["key"]
        body = status_of(gateway, key, wilcoxon=await _fleet_tests(gateway, key))
        age = gateway.stale_age()
        return maybe_stale(JSONResponse({**body, **stale_field(age)}), age)

    def act(action: str) -> Action:
        async def handler(request: Request, req: ActionRequest) -> Response:
            # NotFoundError (404) and IllegalTransition (409) are answered by `guarded`
            await gateway.controller.act(req.key, action, actor=req.caller.name, reason=req.reason)
            tests = await _fleet_tests(gateway, req.key)
            return JSONResponse(status_of(gateway, req.key, wilcoxon=tests))

        return handler

    routes = [Route("/admin/flags/{key}/status", guarded(auth, "viewer", status), methods=["GET"])]
    routes += [action_route(auth, action, act(action)) for action in ROLLOUT_ACTIONS]
    return routes


SignedRankTests = dict[tuple[str, str], dict[str, Any]]


async def _fleet_tests(gateway: AdminGateway, key: str) -> SignedRankTests | None:
    flag = gateway.flag(key)
    return await gateway.mirror.signed_rank_tests(flag, gateway.store) if flag else None


def status_of(
    gateway: AdminGateway,
    key: str,
    *,
    wilcoxon: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> dict[str, object]:
    """The status document; `wilcoxon` holds the signed-rank tests on the fleet's pairs
    (`Mirror.signed_rank_tests`; absent: each runs on this replica's own pairs)."""
    flag = gateway.flag(key)
    if flag is None:
        raise NotFoundError(f"no flag {key!r}")
    controller = gateway.controller
    return flag_status(
        flag,
        controller.rollout(key),
        time.time(),
        pending_rollback=controller.rollback_pending(key),
        shadows=gateway.mirror.report(flag, wilcoxon),
    )
