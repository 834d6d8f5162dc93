"""Verbs that need no running gateway: `flags validate`, offline `assign`.

Both read a flags file (YAML or JSON, read strictly by `load_yaml`) and go through the same
parsing and assignment code as the server, so what they say is what the gateway would do.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from gateway.cli import app, flags_app, online
from gateway.core.assignment import Assigner, StaticFacts
from gateway.core.documents import load_yaml
from gateway.core.flags import ExponentialSchedule, Flag, FlagSet, parse_flag_set
from gateway.errors import InvalidDocument

FlagsFile = Annotated[Path, typer.Argument(help="Flags file, YAML or JSON.", show_default=False)]


@flags_app.command("validate")
def validate(file: FlagsFile) -> None:
    """Check a flags file; print every problem as `path: message` and exit 1 if any."""
    flag_set = load_flags(file)
    keys = ", ".join(flag.key for flag in flag_set.flags)
    typer.echo(f"ok: {len(flag_set.flags)} flags ({keys})")


@app.command("assign")
def assign(
    key: Annotated[str, typer.Argument(metavar="KEY", help="The flag's key.", show_default=False)],
    unit: Annotated[
        str | None,
        typer.Argument(metavar="UNIT", help="A unit id (same as --unit).", show_default=False),
    ] = None,
    flags: Annotated[
        Path | None,
        typer.Option("--flags", help="Evaluate offline against this flags file."),
    ] = None,
    units: Annotated[
        list[str] | None, typer.Option("--unit", help="A unit id; repeatable.")
    ] = None,
    units_file: Annotated[
        Path | None,
        typer.Option("--units-file", help="Unit ids, one per line ('-' reads stdin)."),
    ] = None,
    weight: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Canary weight, offline only (default: the schedule's first weight).",
        ),
    ] = None,
    admin_url: online.AdminUrl = online.DEFAULT_ADMIN_URL,
    token: online.Token = None,
    header: Annotated[
        list[str] | None, typer.Option("--header", help="NAME=VALUE request header (online).")
    ] = None,
    cookie: Annotated[
        list[str] | None, typer.Option("--cookie", help="NAME=VALUE request cookie (online).")
    ] = None,
    query: Annotated[
        list[str] | None, typer.Option("--query", help="NAME=VALUE query parameter (online).")
    ] = None,
) -> None:
    """Which variant each unit gets: one JSON object per unit and line.

    Without --flags, asks the running gateway (--admin-url, GATEWAY_TOKEN) what it does now.
    With --flags the flag is evaluated offline, the canary taken as not rolled back.
    """
    wanted = [*([unit] if unit is not None else []), *(units or [])]
    if units_file is not None:
        wanted.extend(read_units(units_file))
    if flags is None:
        if weight is not None:
            fail("gateway assign: --weight is for the offline form (with --flags FILE)", code=2)
        facts = online.parse_facts(header or [], cookie or [], query or [])
        online.assign_online(key, wanted, facts=facts, admin_url=admin_url, token=token)
        return
    if header or cookie or query:
        fail("gateway assign: --header, --cookie and --query ask a running gateway", code=2)
    flag = find_flag(load_flags(flags), key, flags)
    if not wanted:
        fail("gateway assign: give a UNIT, --unit U or --units-file F", code=2)
    for line in assign_lines(flag, wanted, start_weight(flag) if weight is None else weight):
        typer.echo(line)


def assign_lines(flag: Flag, units: list[str], weight: float) -> Iterator[str]:
    """One JSON line per unit, as a request carrying that unit in the flag's source would get."""
    assigner = Assigner(flag)
    rand = random.Random(0).random  # used only for an empty unit under on_missing random|cookie
    source, name = flag.unit.source, flag.unit.name
    for unit in units:
        facts = StaticFacts(
            headers={name: unit} if source == "header" else {},
            cookies={name: unit} if source == "cookie" else {},
            params={name: unit} if source == "query" else {},
        )
        got = assigner.assign(
            assigner.unit_from(facts), facts, weight=weight, canary_open=True, rand=rand
        )
        record = {"unit": got.unit, "variant": got.variant, "bucket": got.bucket}
        yield json.dumps({**record, "reason": str(got.reason)})


def start_weight(flag: Flag) -> float:
    """The canary weight a new rollout starts at."""
    if isinstance(flag.schedule, ExponentialSchedule):
        return flag.schedule.p0
    return flag.schedule.steps[0].weight


def load_flags(path: Path) -> FlagSet:
    """Parse a flags file or exit 1, printing every problem to stderr."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
    try:
        return parse_flag_set(load_yaml(text))
    except InvalidDocument as exc:
        for error in exc.errors:
            typer.echo(str(error), err=True)
        raise typer.Exit(1) from exc


def find_flag(flag_set: FlagSet, key: str, path: Path) -> Flag:
    flag = flag_set.get(key)
    if flag is None:
        known = ", ".join(f.key for f in flag_set.flags) or "none"
        fail(f"{path}: no flag {key!r} (flags: {known})")
    return flag


def read_units(path: Path) -> list[str]:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
    return [line.strip() for line in text.splitlines() if line.strip()]


def fail(message: str, *, code: int = 1) -> NoReturn:
    """Exit with `message` on stderr: 1 for bad input files, 2 for bad usage (as click does)."""
    typer.echo(message, err=True)
    raise typer.Exit(code)
