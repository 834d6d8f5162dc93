"""Verbs that talk to a running gateway's admin API: `flags apply|list|get|history`, online
`assign` (called by the `assign` command in offline.py when no --flags file is given).

Every verb takes `--admin-url` (GATEWAY_ADMIN_URL, default http://127.0.0.1:9090) and `--token`
(GATEWAY_TOKEN). Failures print one clear message on stderr and exit with a code a script can
branch on: 1 refused or invalid (401/403, 404, a rejected document with every problem listed, an
unavailable flag store), 2 bad usage (click's own), 3 the admin API unreachable, 4 a conflict
(409: someone else changed the flag first). The token is sent, never printed.

`--json` on a read verb prints the admin API's answer unchanged, so a script sees the same shape
as the API documents.
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
from gateway.core.documents import load_yaml
from gateway.core.flags import parse_flag, parse_flag_set
from gateway.core.lifecycle import Consequence, consequence
from gateway.core.schedule import Phase
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


EXIT_REFUSED = 1  # refused (401/403), not found, invalid input, store unavailable
EXIT_USAGE = 2  # bad command line (click's own code)
EXIT_UNREACHABLE = 3  # no answer from the admin API
EXIT_CONFLICT = 4  # 409: the flag changed since it was read


class Failure(Exception):
    """A failed call, with the message to print and the exit code it means."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_REFUSED) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


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
                f"{self._hint}",
                EXIT_UNREACHABLE,
            ) from exc
        if response.status_code not in ok:
            raise Failure(_explain(response), _exit_code(response))
        return response

    def json(self, path: str, **kwargs: Any) -> Any:
        return _body(self.call("GET", path, **kwargs))


def _exit_code(response: httpx.Response) -> int:
    """4 for a version conflict only: a 409 for an illegal transition (pausing a paused
    rollout) is a refusal, and retrying after a re-read would not help."""
    body = _body(response)
    error = body.get("error") if isinstance(body, dict) else None
    return EXIT_CONFLICT if response.status_code == 409 and error == "conflict" else EXIT_REFUSED


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
    rollout: str = ""  # what the edit does to the rollout (DESIGN 4's words)

    @property
    def needed(self) -> bool:
        return self.version is None or bool(self.changes)


def read_documents(path: Path) -> list[dict[str, Any]]:
    """The flags in a file, as written, after local validation (every problem printed)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
    try:
        doc: Any = load_yaml(text)
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
        effect = consequence(None, parse_flag(document), None) if document.get("canary") else ""
        return Plan(key, document, None, diff({}, document), effect)
    current = response.json()
    changes = diff(current["document"], document)
    rolls_out = document.get("canary") or current["document"].get("canary")
    effect = _effect(client, key, current["document"], document) if changes and rolls_out else ""
    return Plan(key, document, current["version"], changes, effect)


def _effect(
    client: AdminClient, key: str, before: dict[str, Any], after: dict[str, Any]
) -> Consequence:
    """What storing `after` does to the flag's rollout, by the rule the gateway applies."""
    state = client.json(f"/admin/flags/{key}/status").get("state")
    phase = Phase(state) if state in {p.value for p in Phase} else None
    try:
        return consequence(parse_flag(before), parse_flag(after), phase)
    except InvalidDocument:
        return consequence(None, parse_flag(after), None)


def describe(p: Plan) -> Iterator[str]:
    if p.version is None:
        yield f"{p.key}: create (new flag)"
    elif not p.changes:
        yield f"{p.key}: unchanged (version {p.version})"
        return
    else:
        yield f"{p.key}: {len(p.changes)} change(s) to version {p.version}"
    yield from (f"  {change_line(c)}" for c in p.changes)
    if p.rollout:
        yield f"  rollout: {p.rollout}"


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
    failed, code = 0, EXIT_REFUSED
    with AdminClient(admin_url, token) as client:
        try:
            plans = [plan(client, doc) for doc in documents]
        except Failure as exc:
            fail(str(exc), exc.code)
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
                code = exc.code if not failed else code  # the first failure's kind
                failed += 1
                typer.echo(f"{p.key}: {exc}", err=True)
    if failed:
        fail(f"{failed} of {len(plans)} flag(s) not applied", code)


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


AsJson = Annotated[
    bool, typer.Option("--json", help="Print the admin API's JSON answer, unchanged.")
]


def read(admin_url: str, token: str | None, path: str, **kwargs: Any) -> Any:
    """One GET against the admin API, or exit with the failure's code."""
    with AdminClient(admin_url, token) as client:
        try:
            return client.json(path, **kwargs)
        except Failure as exc:
            fail(str(exc), exc.code)


def echo_json(doc: object) -> None:
    typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))


@flags_app.command("list")
def list_flags(
    as_json: AsJson = False, admin_url: AdminUrl = DEFAULT_ADMIN_URL, token: Token = None
) -> None:
    """Every flag: key, version, route, stable and canary."""
    answer = read(admin_url, token, "/admin/flags")
    if as_json:
        echo_json(answer)
        return
    flags = answer["flags"]
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
    output: Annotated[
        str,
        typer.Option(
            "-o",
            "--output",
            help="json: the API's answer (key, version, document); yaml: a flags file with "
            "this flag, ready for `gateway flags apply -`.",
        ),
    ] = "json",
    as_json: AsJson = False,
    admin_url: AdminUrl = DEFAULT_ADMIN_URL,
    token: Token = None,
) -> None:
    """One flag: as JSON (key, version and the stored document) or as an appliable flags file."""
    if output not in ("json", "yaml"):
        fail(f"--output must be json or yaml, got {output!r}", EXIT_USAGE)
    answer = read(admin_url, token, f"/admin/flags/{key}")
    if output == "json" or as_json:
        echo_json(answer)
        return
    typer.echo(f"# {key} at version {answer['version']}", nl=True)
    typer.echo(yaml.safe_dump({"flags": [answer["document"]]}, sort_keys=False), nl=False)


@flags_app.command("delete")
def delete(
    key: Annotated[str, typer.Argument(help="The flag's key.")],
    version: Annotated[
        int | None,
        typer.Option(
            "--if-match",
            help="Delete only at this version (default: the version read just before).",
        ),
    ] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why: recorded in the audit.")
    ] = None,
    admin_url: AdminUrl = DEFAULT_ADMIN_URL,
    token: Token = None,
) -> None:
    """Delete a flag at a known version (If-Match): a flag changed meanwhile is kept (exit 4)."""
    with AdminClient(admin_url, token) as client:
        try:
            if version is None:
                version = int(client.json(f"/admin/flags/{key}")["version"])
            headers = {"If-Match": f'"{version}"'}
            if reason:
                headers["X-Gateway-Reason"] = reason
            client.call("DELETE", f"/admin/flags/{key}", headers=headers, ok=(204,))
        except Failure as exc:
            fail(str(exc), exc.code)
    typer.echo(f"{key}: deleted (was version {version})")


@flags_app.command("history")
def history(
    key: Annotated[str, typer.Argument(help="The flag's key.")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most N events.")] = 20,
    as_json: AsJson = False,
    admin_url: AdminUrl = DEFAULT_ADMIN_URL,
    token: Token = None,
) -> None:
    """The flag's audit trail, newest first: who, when, what, and what changed."""
    answer = read(admin_url, token, "/admin/audit", params={"flag": key, "limit": limit})
    if as_json:
        echo_json(answer)
        return
    events = answer["events"]
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
                fail(str(exc), exc.code)


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
