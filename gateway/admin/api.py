"""The admin API (DESIGN 8): flag documents with versions, the audit, assignment look-ups.

Owns the admin routes and the way they answer: JSON bodies, `ETag: "<version>"` and
`If-Match` (compare-and-set on the store's version), and one table that turns the gateway's
errors into HTTP answers (`_ANSWERS`), so every route fails the same way. Who may call what is
auth.py's; the OpenAPI description is openapi.py's.

Writes go to the flag store, which audits them and announces them to every replica. The replica
that took the write also applies it to its own snapshot before answering, so a client that PUTs
and then sends traffic to the same replica sees its change (read-your-writes).

The list of routes is routes.py's. To add a route: a read is `guarded(auth, "viewer",
handler)`; an operator action on a flag with a JSON body `{"reason": "..."}` is
`action_route(auth, "rollback", act)`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin.auth import Authenticator, AuthError, Principal, Role
from gateway.admin.ports import AdminGateway
from gateway.core.assignment import StaticFacts
from gateway.core.docdiff import diff
from gateway.core.documents import load_json
from gateway.core.flags import Flag, parse_flag, routes_overlap
from gateway.core.flags import Route as FlagRoute
from gateway.core.lifecycle import consequence
from gateway.errors import (
    ConflictError,
    FieldError,
    GatewayError,
    IllegalTransition,
    InvalidDocument,
    NotFoundError,
    PreconditionRequired,
    StoreUnavailable,
)
from gateway.flagstore import AuditEvent, StoredFlag

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # a flag document is a few KiB; this only stops abuse
MAX_AUDIT_LIMIT = 1000
MAX_REASON = 500
REASON_HEADER = "x-gateway-reason"
STALE_HEADER = "x-gateway-stale"  # on reads served from the snapshot while the store is away
FACT_SOURCES = ("header", "cookie", "query")

Handler = Callable[[Request, Principal], Awaitable[Response]]


class ApiError(GatewayError):
    """A request the admin API refuses before it reaches the store (bad header, body, query)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code = status, code
        super().__init__(message)


# --- answers -----------------------------------------------------------------------------------


def error_response(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status, headers=headers)


def _conflict(exc: ConflictError) -> JSONResponse:
    message = (
        f"flag {exc.key!r} does not exist (any more): create it without If-Match"
        if exc.actual is None
        else str(exc)
    )
    return error_response(409, "conflict", message, current_version=exc.actual)


def _invalid(exc: InvalidDocument) -> JSONResponse:
    errors = [e.as_dict() for e in exc.errors]
    return error_response(422, "invalid", f"{len(errors)} problem(s) found", errors=errors)


# The one place where the gateway's errors become HTTP answers (most specific class first).
_ANSWERS: dict[type[GatewayError], Callable[[Any], JSONResponse]] = {
    ApiError: lambda e: error_response(e.status, e.code, str(e)),
    InvalidDocument: _invalid,
    ConflictError: _conflict,
    PreconditionRequired: lambda e: error_response(428, "precondition_required", str(e)),
    NotFoundError: lambda e: error_response(404, "not_found", str(e)),
    IllegalTransition: lambda e: error_response(409, "illegal_transition", str(e)),
    StoreUnavailable: lambda e: error_response(503, "store_unavailable", str(e)),
}


def answer_for(exc: GatewayError) -> JSONResponse | None:
    for cls in type(exc).__mro__:
        answer = _ANSWERS.get(cls)
        if answer is not None:
            return answer(exc)
    return None


def guarded(auth: Authenticator, needs: Role, handler: Handler) -> Callable[..., Any]:
    """`handler` behind the token check, with errors answered from `_ANSWERS`."""

    async def endpoint(request: Request) -> Response:
        try:
            caller = auth.authorize(request.headers.get("authorization"), needs)
        except AuthError as exc:
            log.info("admin: refused %s %s: %s", request.method, request.url.path, exc.code)
            return error_response(exc.status, exc.code, exc.message, headers=exc.headers)
        try:
            return await handler(request, caller)
        except StoreUnavailable as exc:
            message = str(exc)
            if request.method != "GET" and "nothing was written" not in message:
                message += "; nothing was written: retry when the store is back"
            return error_response(503, "store_unavailable", message)
        except GatewayError as exc:
            answer = answer_for(exc)
            if answer is None:
                raise
            return answer

    return endpoint


def _stored(entry: StoredFlag, status: int = 200, **extra: Any) -> JSONResponse:
    body = {"key": entry.key, "version": entry.version, "document": entry.document, **extra}
    return JSONResponse(body, status, headers={"ETag": f'"{entry.version}"'})


# --- request parts ----------------------------------------------------------------------------


def if_match(request: Request, *, required: bool) -> int | None:
    """The version in If-Match: `3` and `"3"` are both accepted."""
    raw = request.headers.get("if-match")
    if raw is None:
        if required:
            raise PreconditionRequired("send If-Match with the flag's current version (its ETag)")
        return None
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not text.isdigit():
        raise ApiError(400, "bad_request", 'If-Match must be a version such as 3 or "3"')
    return int(text)


async def read_json(request: Request) -> object:
    """The body as JSON (at most MAX_BODY_BYTES), or InvalidDocument at `$`."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "too_large", f"request body over {MAX_BODY_BYTES} bytes")
    return load_json(bytes(body))


def _reason(text: object, path: str) -> str:
    if not isinstance(text, str):
        raise InvalidDocument([FieldError(path, "must be a string")])
    if len(text) > MAX_REASON:
        raise InvalidDocument([FieldError(path, f"at most {MAX_REASON} characters")])
    return text


def _only(request: Request, *names: str) -> None:
    """A misspelt filter must not silently widen the answer: unknown parameters are refused."""
    unknown = [name for name in request.query_params if name not in names]
    if unknown:
        message = f"unknown parameter: use {', '.join(names)}"
        raise InvalidDocument([FieldError(f"query.{name}", message) for name in unknown])


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_AUDIT_LIMIT:
        message = f"must be a whole number from 1 to {MAX_AUDIT_LIMIT}, got {raw!r}"
        raise InvalidDocument([FieldError("query.limit", message)])
    return int(raw)


# --- flag documents ----------------------------------------------------------------------------


def checked_document(
    key: str, doc: object, others: list[StoredFlag]
) -> tuple[Flag, dict[str, Any]]:
    """The PUT body as a valid flag document for `key` (its own rules and no route overlapping
    one of `others`), or InvalidDocument with every problem; validate_api runs the same check."""
    if not isinstance(doc, dict):
        raise InvalidDocument([FieldError("$", "must be a JSON object (a flag document)")])
    errors: list[FieldError] = []
    if "key" not in doc:
        doc = {"key": key, **doc}
    elif doc["key"] != key:
        errors.append(
            FieldError("key", f"must equal the key in the URL ({key!r}), got {doc['key']!r}")
        )
    flag: Flag | None = None
    try:
        flag = parse_flag(doc)
    except InvalidDocument as exc:
        errors.extend(exc.errors)
    errors.extend(_overlap_errors(doc.get("route"), key, others))
    if errors or flag is None:
        raise InvalidDocument(errors)
    return flag, doc


def _overlap_errors(raw_route: object, key: str, others: list[StoredFlag]) -> list[FieldError]:
    try:
        route = FlagRoute.model_validate(raw_route)
    except ValidationError:
        return []  # parse_flag reports what is wrong with it
    clashes = [o for o in others if o.key != key and routes_overlap(route, o.flag.route)]
    return [
        FieldError("route", f"overlaps the route of flag {o.key!r} ({o.flag.route.path_prefix!r})")
        for o in clashes
    ]


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """An operator action on one flag: who, on what, and why."""

    key: str
    reason: str
    caller: Principal


Action = Callable[[Request, ActionRequest], Awaitable[Response]]


def action_route(auth: Authenticator, name: str, act: Action) -> Route:
    """`POST /admin/flags/{key}/{name}` with body `{"reason": "..."}`, operator only."""

    async def handler(request: Request, caller: Principal) -> Response:
        body = await read_json(request)
        if not isinstance(body, dict) or set(body) - {"reason"}:
            raise InvalidDocument([FieldError("$", 'must be a JSON object {"reason": "..."}')])
        reason = _reason(body.get("reason", ""), "reason")
        return await act(request, ActionRequest(request.path_params["key"], reason, caller))

    return Route(
        f"/admin/flags/{{key}}/{name}", guarded(auth, "operator", handler), methods=["POST"]
    )


# --- the routes --------------------------------------------------------------------------------


class AdminApi:
    """The handlers; each reads the store (the source of truth) or the replica's snapshot."""

    def __init__(self, gateway: AdminGateway) -> None:
        self._gateway = gateway
        self._rand = random.Random().random  # only for unit-less requests (on_missing: random)

    async def list_flags(self, request: Request, caller: Principal) -> Response:
        try:
            flags, age = await self._gateway.store.load(), None
        except StoreUnavailable as exc:
            flags, age = self._snapshot_or_raise(exc)
        body = [{"key": f.key, "version": f.version, "document": f.document} for f in flags]
        return maybe_stale(JSONResponse({"flags": body, **stale_field(age)}), age)

    async def get_flag(self, request: Request, caller: Principal) -> Response:
        key = request.path_params["key"]
        try:
            return _stored(await self._existing(key))
        except StoreUnavailable as exc:
            flags, age = self._snapshot_or_raise(exc)
        entry = next((f for f in flags if f.key == key), None)
        if entry is None:
            raise NotFoundError(f"no flag {key!r} in this replica's snapshot (the store is away)")
        body = {"key": entry.key, "version": entry.version, "document": entry.document}
        headers = {"ETag": f'"{entry.version}"'}
        return maybe_stale(JSONResponse({**body, **stale_field(age)}, headers=headers), age)

    def _snapshot_or_raise(self, exc: StoreUnavailable) -> tuple[list[StoredFlag], float]:
        """During an outage, reads come from this replica's snapshot, marked stale (the age is
        NaN when it never synced: started while Redis was away, from the flags file)."""
        flags = self._gateway.snapshot_flags()
        if flags is None:
            raise exc
        age = self._gateway.stale_age()
        return flags, math.nan if age is None else age

    async def put_flag(self, request: Request, caller: Principal) -> Response:
        """Create (no If-Match: 201, or 428 when the key exists) or replace (If-Match: 200).

        The answer and the audit event say what the edit does to the rollout (`rollout`:
        keeps, starts a new rollout, stays rolled back)."""
        key = request.path_params["key"]
        expected = if_match(request, required=False)
        reason = _reason(request.headers.get(REASON_HEADER, ""), REASON_HEADER)
        store = self._gateway.store
        flag, doc = checked_document(key, await read_json(request), await store.load())
        current = await store.get(key)
        if current is not None and expected is None:
            raise PreconditionRequired(
                f"flag {key!r} exists (version {current.version}): send If-Match with its version"
            )
        if current is not None and expected != current.version:
            raise ConflictError(key, expected, current.version)
        rollout = await store.rollout(key) if current is not None else None
        effect = consequence(
            current.flag if current else None,
            flag,
            rollout.phase if rollout else None,
            rolling=rollout.plan if rollout else None,
        )
        event = AuditEvent(
            ts=time.time(),
            actor=caller.name,
            action="create" if expected is None else "replace",
            flag=key,
            diff=diff(current.document if current is not None else {}, doc),
            reason=reason,
            details={"rollout": effect},
        )
        # The store decides create or replace atomically: 201 only when the key was absent.
        stored = await store.put(flag, doc, if_match=expected, event=event)
        log.info("admin: %s %s: %s version %d", caller.name, event.action, key, stored.version)
        await self._refresh(key)
        return _stored(stored, 201 if expected is None else 200, rollout=effect)

    async def delete_flag(self, request: Request, caller: Principal) -> Response:
        key = request.path_params["key"]
        expected = if_match(request, required=True)
        reason = _reason(request.headers.get(REASON_HEADER, ""), REASON_HEADER)
        current = await self._existing(key)
        if expected != current.version:
            raise ConflictError(key, expected, current.version)
        event = AuditEvent(
            ts=time.time(),
            actor=caller.name,
            action="delete",
            flag=key,
            diff=diff(current.document, {}),
            reason=reason,
        )
        assert expected is not None  # required=True
        await self._gateway.store.delete(key, if_match=expected, event=event)
        log.info("admin: %s delete: %s at version %d", caller.name, key, expected)
        await self._refresh(key)
        return Response(status_code=204)

    async def audit(self, request: Request, caller: Principal) -> Response:
        _only(request, "flag", "limit")
        flag = request.query_params.get("flag") or None
        events = await self._gateway.store.audit(flag=flag, limit=_limit(request))
        return JSONResponse({"events": [_event(e) for e in events]})

    async def assign(self, request: Request, caller: Principal) -> Response:
        params = request.query_params
        key = params.get("flag")
        if not key:
            raise InvalidDocument([FieldError("query.flag", "required: the flag's key")])
        runtime = self._gateway.flag(key)
        if runtime is None:
            raise NotFoundError(f"no flag {key!r} on this gateway")
        facts = _facts(params.multi_items())
        assigner = runtime.assigner
        unit = params.get("unit") or assigner.unit_from(facts)
        got = assigner.assign(
            unit, facts, weight=runtime.weight, canary_open=runtime.canary_open, rand=self._rand
        )
        rollout = self._gateway.controller.rollout(key)
        return JSONResponse(
            {
                "flag": key,
                "version": runtime.version,
                "unit": got.unit,
                "variant": got.variant,
                "role": got.role,
                "bucket": got.bucket,
                "reason": str(got.reason),
                "weight": runtime.weight if runtime.canary_open else 0.0,
                "canary_open": runtime.canary_open,
                "state": rollout.phase.value if rollout is not None else None,
                "upstream": _upstream(runtime.flag, got.variant),
            }
        )

    async def _existing(self, key: str) -> StoredFlag:
        current = await self._gateway.store.get(key)
        if current is None:
            raise NotFoundError(f"no flag {key!r}")
        return current

    async def _refresh(self, key: str) -> None:
        """Apply the write to this replica's snapshot before answering (read-your-writes): the
        store's own announcement reaches every replica too, but only after the write returns."""
        await self._gateway.on_change("flag", key)


def stale_field(age: float | None) -> dict[str, Any]:
    if age is None:
        return {}
    return {"stale": {"sync_age_s": None if math.isnan(age) else round(age, 3)}}


def maybe_stale(response: Response, age: float | None) -> Response:
    """Mark an answer served from the snapshot while the store is away (header and field)."""
    if age is not None:
        shown = "unknown" if math.isnan(age) else f"{age:.3f}"
        response.headers[STALE_HEADER] = f"sync-age={shown}"
    return response


def _event(event: AuditEvent) -> dict[str, Any]:
    when = datetime.fromtimestamp(event.ts, UTC).isoformat().replace("+00:00", "Z")
    return {**event.as_dict(), "time": when}


def _facts(items: list[tuple[str, str]]) -> StaticFacts:
    """`header.<name>=v`, `cookie.<name>=v`, `query.<name>=v` from the query string."""
    found: dict[str, dict[str, str]] = {source: {} for source in FACT_SOURCES}
    errors = []
    for name, value in items:
        if name in ("flag", "unit"):
            continue
        source, _, fact = name.partition(".")
        if source in found and fact:
            found[source].setdefault(fact, value)
        else:
            message = (
                "unknown parameter: use flag, unit, header.<name>, cookie.<name>, query.<name>"
            )
            errors.append(FieldError(f"query.{name}", message))
    if errors:
        raise InvalidDocument(errors)
    return StaticFacts(headers=found["header"], cookies=found["cookie"], params=found["query"])


def _upstream(flag: Flag, variant: str) -> str | None:
    arms = [flag.stable, *([flag.canary] if flag.canary else []), *flag.variants]
    return next((arm.upstream for arm in arms if arm.name == variant), None)
