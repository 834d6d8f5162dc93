"""Every `/admin` route in one list, for the admin app (mounted next to `health_routes`)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin.api import AdminApi, guarded
from gateway.admin.auth import Authenticator
from gateway.admin.openapi import openapi_document
from gateway.admin.ports import AdminGateway
from gateway.admin.rollout_api import rollout_routes
from gateway.admin.validate_api import validate_routes


def admin_routes(gateway: AdminGateway) -> list[Route]:
    """Every /admin route; mount next to health_routes on the admin port."""
    auth = Authenticator(gateway.settings.admin.tokens)
    api = AdminApi(gateway)
    spec = openapi_document()

    async def openapi(request: Request) -> Response:
        return JSONResponse(spec)

    return [
        Route("/admin/openapi.json", openapi, methods=["GET"]),
        Route("/admin/flags", guarded(auth, "viewer", api.list_flags), methods=["GET"]),
        Route("/admin/flags/{key}", guarded(auth, "viewer", api.get_flag), methods=["GET"]),
        Route("/admin/flags/{key}", guarded(auth, "operator", api.put_flag), methods=["PUT"]),
        Route("/admin/flags/{key}", guarded(auth, "operator", api.delete_flag), methods=["DELETE"]),
        Route("/admin/audit", guarded(auth, "viewer", api.audit), methods=["GET"]),
        Route("/admin/assign", guarded(auth, "viewer", api.assign), methods=["GET"]),
        *rollout_routes(gateway, auth),
        *validate_routes(gateway, auth),
    ]
