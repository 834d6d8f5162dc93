"""Admin routes that change nothing: a flag document checked as PUT would check it, and who the
caller is.

`POST /admin/flags/{key}/validate` takes a flag document (JSON, or YAML with a YAML content
type) and answers 200 with `valid`, every problem as `{path, message}`, the parsed document, the
diff against the stored version and that version: the same checks PUT runs (the document's own
rules and the overlap with every other flag's route), so an editor can validate as the operator
types and show what saving would change. An invalid document is a normal answer here (200,
`valid: false`), not an error; only a URL whose key no flag could have is refused (422).

`GET /admin/whoami` names the caller's token and role, so a client can hide what the role may
not do (the API refuses it anyway).
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin.api import MAX_BODY_BYTES, ApiError, checked_document, guarded
from gateway.admin.auth import Authenticator, Principal
from gateway.admin.ports import AdminGateway
from gateway.core.docdiff import diff
from gateway.core.flags import KEY_PATTERN
from gateway.errors import FieldError, InvalidDocument

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


async def _body_text(request: Request) -> str:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "too_large", f"request body over {MAX_BODY_BYTES} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidDocument([FieldError("$", "not UTF-8 text")]) from None


def _parsed(text: str, content_type: str) -> object:
    """YAML is a superset of JSON, so one parser reads both; the error says which was meant."""
    kind = "YAML" if content_type in YAML_TYPES else "JSON"
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidDocument([FieldError("$", f"not valid {kind}{where}: {problem}")]) from None


def validate_routes(gateway: AdminGateway, auth: Authenticator) -> list[Route]:
    async def validate(request: Request, caller: Principal) -> Response:
        key = request.path_params["key"]
        if not re.fullmatch(KEY_PATTERN, key):  # the URL, not the document, is wrong: refuse
            raise InvalidDocument([FieldError("key", f"not a valid flag key: {key!r}")])
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        answer: dict[str, Any] = {"key": key, "valid": True, "errors": []}
        store = gateway.store
        current = await store.get(key)
        answer["version"] = current.version if current is not None else None
        try:
            doc = _parsed(await _body_text(request), content_type)
            _, checked = checked_document(key, doc, await store.load())
        except InvalidDocument as exc:
            answer |= {"valid": False, "errors": [e.as_dict() for e in exc.errors]}
            return JSONResponse(answer)
        before = current.document if current is not None else {}
        answer |= {
            "document": checked,
            "yaml": yaml.safe_dump(checked, sort_keys=False, allow_unicode=True),
            "diff": diff(before, checked),
        }
        return JSONResponse(answer)

    async def whoami(request: Request, caller: Principal) -> Response:
        return JSONResponse({"name": caller.name, "role": caller.role})

    return [
        Route("/admin/flags/{key}/validate", guarded(auth, "viewer", validate), methods=["POST"]),
        Route("/admin/whoami", guarded(auth, "viewer", whoami), methods=["GET"]),
    ]
