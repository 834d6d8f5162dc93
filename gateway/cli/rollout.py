"""Rollout verbs through the admin API: `gateway flags status KEY` and
`gateway rollback|promote|pause|resume|restart KEY --reason ...`."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import FrameType
from typing import Annotated, Any

import typer

from gateway.cli import app, flags_app
from gateway.cli.online import (
    DEFAULT_ADMIN_URL,
    EXIT_UNREACHABLE,
    AdminClient,
    AdminUrl,
    Failure,
    Token,
    fail,
)

Reason = Annotated[str, typer.Option("--reason", help="Why: kept in the audit trail.")]
Key = Annotated[str, typer.Argument(help="The flag's key.")]


CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: each frame replaces the last


@flags_app.command("status")
def status(
    key: Key,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status document.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Redraw every --interval seconds until Ctrl-C.")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, help="Seconds between redraws (--watch).")
    ] = 2.0,
    admin_url: AdminUrl = DEFAULT_ADMIN_URL,
    token: Token = None,
) -> None:
    """State, weight now, step, next change, the guard's test, shadows and traffic.

    With --watch the screen is redrawn in place; with --watch --json one status document is
    printed per line instead (for scripts)."""
    with AdminClient(admin_url, token) as client:
        if not watch:
            try:
                doc = client.json(f"/admin/flags/{key}/status")
            except Failure as exc:
                fail(str(exc), exc.code)
            typer.echo(json.dumps(doc, indent=2) if as_json else "\n".join(describe(doc)))
            return
        with contextlib.suppress(KeyboardInterrupt), _interrupt_event() as interrupted:
            while not interrupted.is_set():
                _frame(client, key, as_json=as_json, interval=interval)
                interrupted.wait(interval)


@contextlib.contextmanager
def _interrupt_event() -> Iterator[threading.Event]:
    """An event that Ctrl-C sets, in place of the KeyboardInterrupt it raises.

    Raised at an arbitrary point, KeyboardInterrupt can land in a finalizer, where Python only
    prints it and goes on, and the watch never ended. The first Ctrl-C lets the frame being
    drawn finish; a second one, should a request hang, raises as usual."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # signal handlers can only be set from the main thread
        return

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupted.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def _frame(client: AdminClient, key: str, *, as_json: bool, interval: float) -> None:
    try:
        doc = client.json(f"/admin/flags/{key}/status")
    except Failure as exc:
        if exc.code != EXIT_UNREACHABLE:
            fail(str(exc), exc.code)  # a refused token or a gone flag will not get better
        doc = None
        problem = str(exc)
    if as_json:
        if doc is not None:
            typer.echo(json.dumps(doc, separators=(",", ":")))
        return
    now = datetime.now(UTC)
    header = f"every {interval:g}s: gateway flags status {key}    {now:%H:%M:%S} UTC"
    body = describe(doc, now=now.timestamp()) if doc is not None else [problem]
    typer.echo("\n".join([CLEAR + header, "", *body]))


def relative(iso: str | None, now: float) -> str:
    """`in 4m12s` or `3m ago` (and the UTC clock time), '-' for none."""
    if not iso:
        return "-"
    when = datetime.fromisoformat(iso)
    delta = when.timestamp() - now
    words = f"in {span(delta)}" if delta >= 0 else f"{span(-delta)} ago"
    return f"{words} ({when.astimezone(UTC):%H:%M:%S} UTC)"


def span(seconds: float) -> str:
    """4m12s, 2h5m, 3d4h: two units at most, the way an operator says it."""
    s = max(0, round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{s}s" if minutes else f"{s}s"


def describe(doc: dict[str, Any], *, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    lines = [
        f"{doc['key']}: {doc['state']}, canary weight {doc['weight']:.2%}"
        + (f", step {doc['step'] + 1}/{doc['steps']}" if doc.get("step") is not None else ""),
        f"  next change: {relative(doc.get('next_change_at'), now)}   "
        f"running for {span(doc.get('running_s') or 0)}   reason: {doc.get('reason') or '-'}",
    ]
    guard = doc.get("guard")
    if guard:
        lines.append(
            f"  guard: n={guard['n']} k={guard['k']} llr={guard['llr']:+.3f} "
            f"(B={guard['B']:.3f}, A={guard['A']:.3f}; e0={guard['e0']}, e1={guard['e1']}) "
            f"{guard['decision']}"
        )
        lines.append(f"    {guard_words(guard)}")
    for shadow in doc.get("shadows") or []:
        p = "-" if shadow.get("p") is None else f"{shadow['p']:.3g}"
        mean = "-" if shadow.get("mean_diff") is None else f"{shadow['mean_diff']:+.4g}"
        unmeasured = shadow.get("unmeasured") or 0
        lines.append(
            f"  shadow {shadow['shadow']} ({shadow['metric']}): n={shadow['n']} "
            f"mean diff {mean} p={p} (fixed-n)"
            + (f", {unmeasured} unmeasured" if unmeasured else "")
        )
        if shadow.get("verdict"):
            lines.append(f"    verdict: {shadow['verdict']}")
    traffic = ", ".join(f"{k} {v}" for k, v in (doc.get("traffic") or {}).items())
    lines.append(f"  traffic (this replica): {traffic or '-'}")
    return lines


GUARD_WORDS = {
    "continue": "watching: no evidence either way yet; rolls back if llr reaches A, "
    "calls the canary healthy at B",
    "accept": "healthy so far: the canary's error rate looks no worse than e0",
    "reject": "rolled back: the canary's error rate looks like e1 or worse",
}


def guard_words(guard: dict[str, Any]) -> str:
    words = GUARD_WORDS.get(str(guard.get("decision")), str(guard.get("decision")))
    if "alpha_spent" in guard and "alpha" in guard:
        words += f" (false-rollback budget used: {guard['alpha_spent']:.3g} of {guard['alpha']:g})"
    return words


def _act(action: str, key: str, reason: str, admin_url: str, token: str | None) -> None:
    with AdminClient(admin_url, token) as client:
        try:
            response = client.call("POST", f"/admin/flags/{key}/{action}", json={"reason": reason})
        except Failure as exc:
            fail(str(exc), exc.code)
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
