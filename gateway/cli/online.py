"""Verbs that talk to a running gateway's admin API: `flags apply|list|get|history`, online
`assign` (called by the `assign` command in offline.py when no --flags file is given).

Every verb takes `--admin-url` (GATEWAY_ADMIN_URL, default http://127.0.0.1:9090) and `--token`
(GATEWAY_TOKEN). Failures print one clear message on stderr and exit 1: an unreachable gateway,
a refused token (401/403), a stale version (409), a rejected document (422, every problem
listed), an unavailable flag store (503). The token is sent, never printed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
import yaml

from gateway.cli import flags_app
from gateway.core.docdiff import diff
from gateway.core.flags import parse_flag_set
from gateway.errors import InvalidDocument

ENV_ADMIN_URL = "GATEWAY_ADMIN_URL"
ENV_TOKEN = "GATEWAY_TOKEN"
DEFAULT_ADMIN_URL = "http://127.0.0.1:9090"
TIMEOUT_S = 10.0
SHOWN_CHARS = 120  # a long value in a diff line is cut here

AdminUrl = Annotated[
    str,
    typer.Option("--admin-url", envvar=ENV_ADMIN_URL, help="The gateway's admin API."),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token", envvar=ENV_TOKEN, show_default=False, help="Admin bearer token (its secret)."
    ),
]


class Failure(Exception):
    """A failed call, with the message to print."""


def fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(1)


# --- the admin client --------------------------------------------------------------------------


class AdminClient:
    """The admin API over httpx; turns every failure into a `Failure` with a clear message."""

    def __init__(self, url: str, token: str | None, *, hint: str = "") -> None:
        self.url = url.rstrip("/")
        self._hint = hint
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT_S)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        ok: Sequence[int] = (200,),
        **kwargs: Any,
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Failure(
                f"cannot reach the gateway's admin API at {self.url} ({_why(exc)}): is the "
                f"gateway running? Point --admin-url or {ENV_ADMIN_URL} at its admin port"
                f"{self._hint}"
            ) from exc
        if response.status_code not in ok:
            raise Failure(_explain(response))
        return response

    def json(self, path: str, **kwargs: Any) -> Any:
        return _body(self.call("GET", path, **kwargs))


def _why(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or host unreachable"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {TIMEOUT_S:g} s"
    return type(exc).__name__


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _explain(response: httpx.Response) -> str:
    body = _body(response)
    status = response.status_code
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str):
        message = response.text.strip()[:300] or response.reason_phrase
    if status == 401:
        return f"refused (401): {message}. Set {ENV_TOKEN} (or --token) to an admin token"
    if status == 403:
        return f"not allowed (403): {message}"
    if status == 409:
        return f"conflict (409): {message}"
    if status == 422 and isinstance(body, dict) and isinstance(body.get("errors"), list):
        lines = [f"  {e.get('path')}: {e.get('message')}" for e in body["errors"]]
        return "\n".join(["rejected (422):", *lines])
    if status == 503:
        return f"{message} (503): try again when the flag store is back"
    return f"{message} ({status})"


# --- flags apply -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What apply would do to one flag: create (version None), change, or nothing."""

    key: str
    document: dict[str, Any]
    version: int | None
    changes: list[dict[str, Any]]

    @property
    def needed(self) -> bool:
        return self.version is None or bool(self.changes)


def read_documents(path: Path) -> list[dict[str, Any]]:
    """The flags in a file, as written, after local validation (every problem printed)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
        doc = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
    except yaml.YAMLError as exc:
        fail(f"{path}: not valid YAML or JSON: {exc}")
    try:
        parse_flag_set(doc)
    except InvalidDocument as exc:
        for error in exc.errors:
            typer.echo(f"{path}: {error}", err=True)
        raise typer.Exit(1) from exc
    return [dict(item) for item in (doc or {}).get("flags") or []]


def plan(client: AdminClient, document: dict[str, Any]) -> Plan:
    key = document["key"]
    response = client.call("GET", f"/admin/flags/{key}", ok=(200, 404))
    if response.status_code == 404:
        return Plan(key, document, None, diff({}, document))
    current = response.json()
    return Plan(key, document, current["version"], diff(current["document"], document))


def describe(p: Plan) -> Iterator[str]:
    if p.version is None:
        yield f"{p.key}: create (new flag)"
    elif not p.changes:
        yield f"{p.key}: unchanged (version {p.version})"
        return
    else:
        yield f"{p.key}: {len(p.changes)} change(s) to version {p.version}"
    yield from (f"  {change_line(c)}" for c in p.changes)


def change_line(change: dict[str, Any]) -> str:
    path, op = change["path"], change["op"]
    if op == "added":
        return f"+ {path}: {_shown(change['after'])}"
    if op == "removed":
        return f"- {path}: {_shown(change['before'])}"
    return f"~ {path}: {_shown(change['before'])} → {_shown(change['after'])}"


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= SHOWN_CHARS else f"{text[: SHOWN_CHARS - 3]}..."


def put(client: AdminClient, p: Plan, reason: str | None) -> str:
    headers = {"X-Gateway-Reason": reason} if reason else {}
    if p.version is not None:
        headers["If-Match"] = f'"{p.version}"'
    response = client.call(
        "PUT", f"/admin/flags/{p.key}", json=p.document, headers=headers, ok=(200, 201)
    )
    stored = response.json()
    verb = "created" if response.status_code == 201 else "applied"
    return f"{p.key}: {verb}, now version {stored['version']}"


@flags_app.command("apply")
def apply(
    file: Annotated[Path, typer.Argument(help="Flags file, YAML or JSON ('-': stdin).")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; change nothing.")
    ] = False,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why: recorded in the audit.")
    ] = None,
    admin_url: AdminUrl = DEFAULT_ADMIN_URL,
    token: Token = None,
) -> None:
    """Create or update every flag in FILE, each at the version it was read at (If-Match)."""
    documents = read_documents(file)
    failed = 0
    with AdminClient(admin_url, token) as client:
        try:
            plans = [plan(client, doc) for doc in documents]
        except Failure as exc:
            fail(str(exc))
        for p in plans:
            for line in describe(p):
                typer.echo(line)
        if dry_run:
            typer.echo("dry run: nothing was changed")
            return
        for p in (p for p in plans if p.needed):
            try:
                typer.echo(put(client, p, reason))
            except Failure as exc:
                failed += 1
                typer.echo(f"{p.key}: {exc}", err=True)
    if failed:
        fail(f"{failed} of {len(plans)} flag(s) not applied")


# --- flags list | get | history ----------------------------------------------------------------


def _route(doc: dict[str, Any]) -> str:
    route = doc.get("route") or {}
    text = str(route.get("path_prefix", "?"))
    if route.get("host"):
        text = f"{route['host']}{text}"
    if route.get("methods"):
        text += f" [{','.join(route['methods'])}]"
    return text


def _arm(arm: object) -> str:
    if not isinstance(arm, dict):
        return "-"
    return f"{arm.get('name')} {arm.get('upstream')}"


def table(rows: list[list[str]]) -> Iterator[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        yield "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()


@flags_app.command("list")
def list_flags(admin_url: AdminUrl = DEFAULT_ADMIN_URL, token: Token = None) -> None:
    """Every flag: key, version, route, stable and canary."""
    with AdminClient(admin_url, token) as client:
        try:
            flags = client.json("/admin/flags")["flags"]
        except Failure as exc:
            fail(str(exc))
    rows = [["KEY", "VERSION", "ROUTE", "STABLE", "CANARY"]]
    for f in flags:
        doc = f["document"]
        rows.append(
            [
                f["key"],
                str(f["version"]),
                _route(doc),
                _arm(doc.get("stable")),
                _arm(doc.get("canary")),
            ]
        )
    for line in table(rows):
        typer.echo(line)


@flags_app.command("get")
def get(
    key: Annotated[str, typer.Argument(help="The flag's key.")],
    admin_url: AdminUrl = DEFAULT_ADMIN_URL,
    token: Token = None,
) -> None:
    """One flag as JSON: key, version and the stored document."""
    with AdminClient(admin_url, token) as client:
        try:
            typer.echo(json.dumps(client.json(f"/admin/flags/{key}"), indent=2))
        except Failure as exc:
            fail(str(exc))


@flags_app.command("history")
def history(
    key: Annotated[str, typer.Argument(help="The flag's key.")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most N events.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the events as JSON.")] = False,
    admin_url: AdminUrl = DEFAULT_ADMIN_URL,
    token: Token = None,
) -> None:
    """The flag's audit trail, newest first: who, when, what, and what changed."""
    with AdminClient(admin_url, token) as client:
        try:
            events = client.json("/admin/audit", params={"flag": key, "limit": limit})["events"]
        except Failure as exc:
            fail(str(exc))
    if as_json:
        typer.echo(json.dumps(events, indent=2))
        return
    for event in events:
        typer.echo(_event_line(event))
        for change in event.get("diff") or []:
            typer.echo(f"    {change_line(change)}")


def _event_line(event: dict[str, Any]) -> str:
    before, after = event.get("version_before"), event.get("version_after")
    versions = f"v{before or '-'} → v{after or '-'}"
    line = f"{event.get('time')}  {event.get('actor')}  {event.get('action')}  {versions}"
    return f"{line}  reason: {event['reason']}" if event.get("reason") else line


# --- assign (online) ---------------------------------------------------------------------------


def assign_online(
    key: str,
    units: list[str],
    *,
    facts: dict[str, str],
    admin_url: str,
    token: str | None,
) -> None:
    """Ask the gateway which variant each unit gets now: its JSON answer, one per line."""
    hint = "; or evaluate a flags file offline with --flags FILE"
    with AdminClient(admin_url, token, hint=hint) as client:
        wanted: list[str | None] = [*units] or [None]  # no unit: the facts may carry it
        for unit in wanted:
            params = {"flag": key, **({"unit": unit} if unit is not None else {}), **facts}
            try:
                typer.echo(json.dumps(client.json("/admin/assign", params=params)))
            except Failure as exc:
                fail(str(exc))


def parse_facts(headers: list[str], cookies: list[str], queries: list[str]) -> dict[str, str]:
    """`--header name=value` and friends as the admin API's `header.name=value` parameters."""
    facts: dict[str, str] = {}
    for source, items in (("header", headers), ("cookie", cookies), ("query", queries)):
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name:
                typer.echo(f"--{source} takes NAME=VALUE, got {item!r}", err=True)
                raise typer.Exit(2)
            facts[f"{source}.{name}"] = value
    return facts
