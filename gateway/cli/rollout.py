"""Rollout verbs through the admin API: `gateway flags status KEY` and
`gateway rollback|promote|pause|resume|restart KEY --reason ...`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from gateway.cli import app, flags_app
from gateway.cli.online import DEFAULT_ADMIN_URL, AdminClient, AdminUrl, Failure, Token, fail

Reason = Annotated[str, typer.Option("--reason", help="Why: kept in the audit trail.")]
Key = Annotated[str, typer.Argument(help="The flag's key.")]


@flags_app.command("status")
def status(
    key: Key,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status document.")] = False,
    admin_url: AdminUrl = DEFAULT_ADMIN_URL,
    token: Token = None,
) -> None:
    """State, weight now, step, next change, the guard's test, shadows and traffic."""
    with AdminClient(admin_url, token) as client:
        try:
            doc = client.json(f"/admin/flags/{key}/status")
        except Failure as exc:
            fail(str(exc))
    typer.echo(json.dumps(doc, indent=2) if as_json else "\n".join(describe(doc)))


def describe(doc: dict[str, Any]) -> list[str]:
    lines = [
        f"{doc['key']}: {doc['state']}, canary weight {doc['weight']:.2%}"
        + (f", step {doc['step'] + 1}/{doc['steps']}" if doc.get("step") is not None else ""),
        f"  next change: {doc.get('next_change_at') or '-'}   reason: {doc.get('reason') or '-'}",
    ]
    guard = doc.get("guard")
    if guard:
        lines.append(
            f"  guard: n={guard['n']} k={guard['k']} llr={guard['llr']:+.3f} "
            f"(B={guard['B']:.3f}, A={guard['A']:.3f}; e0={guard['e0']}, e1={guard['e1']}) "
            f"{guard['decision']}"
        )
    for shadow in doc.get("shadows") or []:
        p = "-" if shadow.get("p") is None else f"{shadow['p']:.3g}"
        mean = "-" if shadow.get("mean_diff") is None else f"{shadow['mean_diff']:+.4g}"
        lines.append(
            f"  shadow {shadow['shadow']} ({shadow['metric']}): n={shadow['n']} "
            f"mean diff {mean} p={p}"
        )
    traffic = ", ".join(f"{k} {v}" for k, v in (doc.get("traffic") or {}).items())
    lines.append(f"  traffic (this replica): {traffic or '-'}")
    return lines


def _act(action: str, key: str, reason: str, admin_url: str, token: str | None) -> None:
    with AdminClient(admin_url, token) as client:
        try:
            response = client.call("POST", f"/admin/flags/{key}/{action}", json={"reason": reason})
        except Failure as exc:
            fail(str(exc))
    typer.echo("\n".join(describe(response.json())))


def _verb(action: str, summary: str) -> None:
    def command(
        key: Key, reason: Reason = "", admin_url: AdminUrl = DEFAULT_ADMIN_URL, token: Token = None
    ) -> None:
        _act(action, key, reason, admin_url, token)

    command.__doc__ = summary
    app.command(action)(command)


for _action, _summary in (
    ("rollback", "Roll the canary back now: weight 0 until `restart`."),
    ("promote", "Promote the canary to stable now."),
    ("pause", "Freeze the canary weight and the rollout clock."),
    ("resume", "Resume a paused rollout where it stopped."),
    ("restart", "Start a new rollout from the first step."),
):
    _verb(_action, _summary)
