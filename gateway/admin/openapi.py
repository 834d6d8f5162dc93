"""The admin API's OpenAPI 3.1 description, served at GET /admin/openapi.json.

Written out by hand next to the routes in admin.py (one entry per route, same words), except
the flag document's schema, which comes from the pydantic model so that it can never drift from
what PUT actually accepts. Adding a route to admin.py means adding its operation here; the
integration test checks that every admin route is described.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from gateway.core import flags as flag_models
from gateway.core.durations import parse_duration, parse_rate
from gateway.core.flags import KEY_PATTERN, Flag

Json = dict[str, Any]

# pydantic leaves `Field(ge=...)` on an annotated alias as its own keyword, which JSON Schema
# ignores; these are the JSON Schema names of those bounds.
_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
# pydantic describes what a duration or a rate is parsed into (a float); a stored document keeps
# what the operator wrote ("1h30m", "0.1/h"), so both spellings are described.
_SPELLINGS: dict[Any, tuple[Json, Json]] = {
    parse_duration: (
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+\s*$"},
    ),
    parse_rate: (
        {"type": "number", "exclusiveMinimum": 0},
        {
            "type": "string",
            "pattern": r"^\s*[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?\s*/\s*(ms|s|m|h|d)\s*$",
        },
    ),
}

ERROR_STATUSES = {
    "400": "Bad request (a malformed header or query parameter).",
    "401": "Missing, malformed or unknown bearer token.",
    "403": "The token's role may not do this, or no admin tokens are configured.",
    "404": "No such flag.",
    "409": "The flag's version is not the one in If-Match (or it was created meanwhile).",
    "413": "Request body too large.",
    "422": "The request was rejected: every problem is listed in `errors`.",
    "428": "If-Match is required to replace or delete a flag.",
    "503": "The flag store cannot take writes now; nothing was written.",
}

_ERROR_SCHEMA = {"$ref": "#/components/schemas/Error"}


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Json, description: str, headers: Json | None = None) -> Json:
    response: Json = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _errors(*statuses: str) -> Json:
    return {s: {"$ref": f"#/components/responses/E{s}"} for s in ("401", "403", *statuses)}


def _flag_schemas() -> Json:
    """The flag document's schema and every schema it refers to, from the pydantic model."""
    flag = Flag.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    schemas: Json = {**flag.pop("$defs", {}), "Flag": flag}
    _bounds(schemas)
    _as_written(schemas)
    flag["properties"]["key"]["pattern"] = KEY_PATTERN
    flag["description"] = (
        "A flag document (DESIGN 2). Every field but key, route and stable has a default."
    )
    body = copy.deepcopy(flag)
    body["required"] = [name for name in body["required"] if name != "key"]
    body["title"] = "FlagInput"
    body["description"] = "A flag document as sent to PUT: `key` may be left out (it is the URL's)."
    return {**schemas, "FlagInput": body}


def _bounds(node: object) -> None:
    if isinstance(node, dict):
        for short, name in _BOUNDS.items():
            if short in node and node.get("type") in ("number", "integer"):
                node[name] = node.pop(short)
        for child in node.values():
            _bounds(child)
    elif isinstance(node, list):
        for child in node:
            _bounds(child)


def _as_written(schemas: Json) -> None:
    """Durations and rates: a number, or the string an operator writes."""
    for name, schema in schemas.items():
        model = getattr(flag_models, name, None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for field_name, info in model.model_fields.items():
            parsers = {getattr(m, "func", None) for m in info.metadata}
            spelled = next((v for parser, v in _SPELLINGS.items() if parser in parsers), None)
            prop = schema.get("properties", {}).get(info.alias or field_name)
            if spelled is None or prop is None:
                continue
            number, text = spelled
            bounds = {k: prop.pop(k) for k in list(prop) if k in _BOUNDS.values()}
            prop.pop("type", None)
            prop["anyOf"] = [{**number, **bounds}, text]


def _schemas() -> Json:
    nullable_int = {"type": ["integer", "null"]}
    diff_entry = {
        "type": "object",
        "required": ["path", "op", "before", "after"],
        "properties": {
            "path": {"type": "string", "examples": ["canary.upstream"]},
            "op": {"type": "string", "enum": ["added", "removed", "changed"]},
            "before": {"description": "Value before (null when added)."},
            "after": {"description": "Value after (null when removed)."},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "description": "A short machine-readable code."},
                "message": {"type": "string", "description": "What went wrong, for a person."},
                "errors": {"type": "array", "items": _ref("FieldError")},
                "current_version": {**nullable_int, "description": "On 409: the stored version."},
            },
        },
        "FieldError": {
            "type": "object",
            "required": ["path", "message"],
            "properties": {"path": {"type": "string"}, "message": {"type": "string"}},
        },
        "StoredFlag": {
            "type": "object",
            "required": ["key", "version", "document"],
            "properties": {
                "key": {"type": "string"},
                "version": {"type": "integer", "minimum": 1},
                "document": _ref("Flag"),
                "rollout": {
                    "type": "string",
                    "enum": ["keeps", "starts a new rollout", "stays rolled back"],
                    "description": "PUT only: what the edit does to the flag's rollout.",
                },
            },
        },
        "FlagList": {
            "type": "object",
            "required": ["flags"],
            "properties": {"flags": {"type": "array", "items": _ref("StoredFlag")}},
        },
        "DiffEntry": diff_entry,
        "AuditEvent": {
            "type": "object",
            "required": ["ts", "time", "actor", "action", "flag"],
            "properties": {
                "ts": {"type": "number", "description": "Unix time, seconds."},
                "time": {"type": "string", "format": "date-time"},
                "actor": {"type": "string", "description": "The token's name (never its secret)."},
                "action": {"type": "string", "examples": ["create", "replace", "delete"]},
                "flag": {"type": "string"},
                "version_before": nullable_int,
                "version_after": nullable_int,
                "diff": {"type": "array", "items": _ref("DiffEntry")},
                "reason": {"type": "string"},
                "details": {"type": "object"},
            },
        },
        "AuditList": {
            "type": "object",
            "required": ["events"],
            "properties": {"events": {"type": "array", "items": _ref("AuditEvent")}},
        },
        "Assignment": {
            "type": "object",
            "required": [
                "flag",
                "version",
                "unit",
                "variant",
                "role",
                "bucket",
                "reason",
                "weight",
            ],
            "properties": {
                "flag": {"type": "string"},
                "version": {"type": "integer"},
                "unit": {"type": ["string", "null"]},
                "variant": {"type": "string"},
                "role": {"type": "string", "enum": ["stable", "canary", "variant"]},
                "bucket": {**nullable_int, "description": "0..9999 (1..100 in unleash mode)."},
                "reason": {
                    "type": "string",
                    "enum": ["rule", "canary", "variant", "stable", "missing-unit"],
                },
                "weight": {"type": "number", "minimum": 0, "maximum": 1},
                "canary_open": {"type": "boolean", "description": "False once rolled back."},
                "state": {"type": ["string", "null"], "description": "The rollout's state."},
                "upstream": {"type": "string"},
            },
        },
        "Status": _status_schema(),
        **_flag_schemas(),
    }


def _status_schema() -> Json:
    number_or_null = {"type": ["number", "null"]}
    guard = {
        "type": ["object", "null"],
        "description": "The guard's current test (DESIGN 5). Test i rolls back at llr >= A_i = "
        "ln(i (i + 1) / alpha) and accepts H0 at llr <= B, then test i + 1 starts at zero; "
        "alpha bounds the whole rollout.",
        "required": [
            "n",
            "k",
            "llr",
            "A",
            "B",
            "e0",
            "e1",
            "test",
            "accepts",
            "alpha",
            "alpha_spent",
            "decision",
        ],
        "properties": {
            "n": {
                "type": "integer",
                "description": "Canary responses in the current test (relative mode: errors "
                "of either arm).",
            },
            "k": {
                "type": "integer",
                "description": "Errors among them (relative mode: the canary's errors).",
            },
            "llr": {"type": "number", "description": "Log-likelihood ratio of H1 over H0."},
            "A": {"type": "number", "description": "Rollback bound of the current test, A_i."},
            "B": {"type": "number", "description": "Acceptance bound ln(beta / (1 - alpha))."},
            "e0": {**number_or_null, "description": "null in relative mode."},
            "e1": {**number_or_null, "description": "null in relative mode."},
            "test": {"type": "integer", "description": "i: 1 + tests ended in this rollout."},
            "accepts": {"type": "integer", "description": "Acceptances in this rollout."},
            "alpha": {"type": "number", "description": "The rollout's false-rollback bound."},
            "alpha_spent": {
                "type": "number",
                "description": "alpha (1 - 1/(i + 1)): the most the tests so far may have spent.",
            },
            "decision": {
                "type": "string",
                "enum": ["continue", "accept", "reject"],
                "description": "The current test's: accept only at the moment of acceptance.",
            },
            "ratio": {"type": "number", "description": "Relative mode: H1's error-rate ratio."},
            "q": {
                **number_or_null,
                "description": "Relative mode: the canary's share of the step's requests.",
            },
        },
    }
    shadow = {
        "type": "object",
        "required": [
            *("shadow", "metric", "n", "mean_diff", "t", "df", "p", "ci95"),
            *("p_always_valid", "cs95", "unmeasured", "wilcoxon", "verdict"),
        ],
        "properties": {
            "shadow": {"type": "string"},
            "metric": {"type": "string"},
            "n": {"type": "integer"},
            "mean_diff": number_or_null,
            "t": number_or_null,
            "df": {"type": ["integer", "null"]},
            "p": number_or_null,
            "ci95": {"type": ["array", "null"], "items": {"type": "number"}},
            "p_always_valid": number_or_null,
            "cs95": {"type": ["array", "null"], "items": {"type": "number"}},
            "tau": number_or_null,
            "unmeasured": {"type": "integer"},
            "wilcoxon": {"type": ["object", "null"]},
            "agreement": {"type": ["object", "null"]},
            "mcnemar": {"type": ["object", "null"]},
            "direction": {"type": "integer", "enum": [-1, 0, 1]},
            "verdict": {"type": "string"},
        },
    }
    return {
        "type": "object",
        "required": [
            "key",
            "state",
            "weight",
            "step",
            "next_change_at",
            "guard",
            "shadows",
            "traffic",
        ],
        "properties": {
            "key": {"type": "string"},
            "state": {"type": "string", "enum": ["running", "paused", "rolled_back", "promoted"]},
            "weight": {"type": "number", "minimum": 0, "maximum": 1},
            "step": {"type": ["integer", "null"]},
            "next_change_at": {"type": ["string", "null"], "format": "date-time"},
            "guard": guard,
            "shadows": {"type": "array", "items": shadow},
            "traffic": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    }


def _components() -> Json:
    responses = {f"E{s}": _json(_ERROR_SCHEMA, text) for s, text in ERROR_STATUSES.items()}
    if_match = {
        "name": "If-Match",
        "in": "header",
        "description": 'The version the change is based on: `3` or `"3"` (the ETag).',
        "schema": {"type": "string", "pattern": '^(\\d+|"\\d+")$'},
    }
    return {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": _schemas(),
        "responses": responses,
        "parameters": {
            "Key": {
                "name": "key",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": KEY_PATTERN},
            },
            "IfMatch": if_match,
            "IfMatchRequired": {**if_match, "required": True},
            "Reason": {
                "name": "X-Gateway-Reason",
                "in": "header",
                "required": False,
                "description": "Why, recorded in the audit event.",
                "schema": {"type": "string", "maxLength": 500},
            },
        },
        "headers": {
            "ETag": {
                "description": 'The flag\'s version, quoted: "3".',
                "schema": {"type": "string"},
            }
        },
    }


def _param(name: str) -> Json:
    return {"$ref": f"#/components/parameters/{name}"}


def _flag_ops() -> Json:
    etag = {"ETag": {"$ref": "#/components/headers/ETag"}}
    stored = _ref("StoredFlag")
    put_body = {"required": True, "content": {"application/json": {"schema": _ref("FlagInput")}}}
    return {
        "parameters": [_param("Key")],
        "get": {
            "operationId": "getFlag",
            "summary": "One flag's document and version (also as ETag).",
            "responses": {"200": _json(stored, "The flag.", etag), **_errors("404")},
        },
        "put": {
            "operationId": "putFlag",
            "summary": "Create (no If-Match) or replace (If-Match: the current version).",
            "parameters": [_param("IfMatch"), _param("Reason")],
            "requestBody": put_body,
            "responses": {
                "200": _json(stored, "Replaced.", etag),
                "201": _json(stored, "Created.", etag),
                **_errors("400", "409", "413", "422", "428", "503"),
            },
        },
        "delete": {
            "operationId": "deleteFlag",
            "summary": "Delete the flag at the version in If-Match.",
            "parameters": [_param("IfMatchRequired"), _param("Reason")],
            "responses": {
                "204": {"description": "Deleted."},
                **_errors("400", "404", "409", "422", "428", "503"),
            },
        },
    }


def _query(name: str, schema: Json, text: str, *, required: bool = False) -> Json:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": text,
    }


def _paths() -> Json:
    assign_facts = {
        "name": "facts",
        "in": "query",
        "description": "Request facts for targeting rules: `header.<name>=v`, `cookie.<name>=v`, "
        "`query.<name>=v` (e.g. `header.x-canary=always`).",
        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
        "style": "form",
        "explode": True,
    }
    return {
        "/admin/flags": {
            "get": {
                "operationId": "listFlags",
                "summary": "Every flag's document and version, by key.",
                "responses": {"200": _json(_ref("FlagList"), "The flags."), **_errors()},
            }
        },
        "/admin/flags/{key}": _flag_ops(),
        "/admin/audit": {
            "get": {
                "operationId": "audit",
                "summary": "Audit events, newest first.",
                "parameters": [
                    _query("flag", {"type": "string"}, "Only this flag's events."),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        "At most this many events.",
                    ),
                ],
                "responses": {"200": _json(_ref("AuditList"), "The events."), **_errors("422")},
            }
        },
        "/admin/assign": {
            "get": {
                "operationId": "assign",
                "summary": "Which variant a unit gets now on this replica, and why.",
                "parameters": [
                    _query(
                        "flag", {"type": "string", "minLength": 1}, "The flag's key.", required=True
                    ),
                    _query(
                        "unit",
                        {"type": "string"},
                        "The unit id (default: read from the facts, as the data plane does).",
                    ),
                    assign_facts,
                ],
                "responses": {
                    "200": _json(_ref("Assignment"), "The assignment."),
                    **_errors("404", "422"),
                },
            }
        },
        "/admin/flags/{key}/status": {
            "get": {
                "operationId": "flagStatus",
                "summary": "Rollout state, weight now, step, next change, guard, shadows, traffic.",
                "parameters": [_param("Key")],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Status"}, "The status."),
                    **_errors("404"),
                },
            }
        },
        **{f"/admin/flags/{{key}}/{action}": _action(action) for action in ROLLOUT_ACTIONS},
        "/admin/flags/{key}/validate": _validate(),
        "/admin/whoami": {
            "get": {
                "operationId": "whoami",
                "summary": "The caller's token name and role (never the secret).",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["name", "role"],
                            "properties": {
                                "name": {"type": "string"},
                                "role": {"enum": ["viewer", "operator"]},
                            },
                        },
                        "Who is calling.",
                    ),
                    **_errors(),
                },
            }
        },
        "/admin/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1 document."}},
            }
        },
    }


ROLLOUT_ACTIONS = {
    "rollback": "Roll the canary back now (weight 0 until a restart).",
    "promote": "Promote the canary to stable now.",
    "pause": "Freeze the weight and the rollout clock.",
    "resume": "Resume a paused rollout where it was.",
    "restart": "Start a new rollout from its first step (after a rollback, say).",
}


def _action(action: str) -> Json:
    return {
        "post": {
            "operationId": action,
            "summary": ROLLOUT_ACTIONS[action] + " Audited with the token's name and reason.",
            "parameters": [_param("Key")],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {"reason": {"type": "string", "maxLength": 500}},
                            "additionalProperties": False,
                        }
                    }
                },
            },
            "responses": {
                "200": _json({"$ref": "#/components/schemas/Status"}, "The status after it."),
                **_errors("400", "404", "409", "422", "503"),
            },
        }
    }


def _validate() -> Json:
    problem = {
        "type": "object",
        "required": ["path", "message"],
        "properties": {"path": {"type": "string"}, "message": {"type": "string"}},
    }
    answer = {
        "type": "object",
        "required": ["key", "valid", "errors", "version"],
        "properties": {
            "key": {"type": "string"},
            "valid": {"type": "boolean"},
            "errors": {"type": "array", "items": problem},
            "version": {"type": ["integer", "null"], "description": "The stored version."},
            "document": {"type": "object", "description": "The document PUT would store."},
            "yaml": {"type": "string", "description": "The same document as YAML."},
            "diff": {"type": "array", "items": {"type": "object"}},
        },
    }
    # Any body is accepted: what is wrong with it is the answer (`valid: false`), not a 4xx.
    any_doc = {"description": "A flag document, or any text to check as one."}
    return {
        "post": {
            "operationId": "validateFlag",
            "summary": "Check a flag document as PUT would, and show the diff; stores nothing. "
            "An invalid document is answered 200 with `valid: false` and every problem.",
            "parameters": [_param("Key")],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": any_doc},
                    "application/yaml": {"schema": any_doc},
                },
            },
            "responses": {
                "200": _json(answer, "The verdict, the parsed document and its diff."),
                **_errors("413", "422", "503"),
            },
        }
    }


def openapi_document() -> Json:
    """The whole description (build once and serve the same object)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "canary gateway admin API",
            "version": "1",
            "description": "Flags with versions (ETag / If-Match), audit, assignment look-ups. "
            "Every route but this document needs `Authorization: Bearer <token>`: role viewer "
            "for GET, operator for writes.",
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": _components(),
    }
