"""`gateway store reset --yes`: the one deliberate way to wipe a Redis flag store (DESIGN 7).

It talks to Redis directly (an operator with access to the store, gateways running or not),
deletes every key under the prefix, starts a new generation marker so no replica takes the
empty store for a lost one (and restores it), and audits `store_reset` with who asked and why.
"""

from __future__ import annotations

import asyncio
import getpass
import socket
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli import app
from gateway.errors import GatewayError

store_app = typer.Typer(help="Operate on the shared flag store.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("reset")
def reset(
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: every flag, rollout and count is deleted.")
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="Settings file (config/gateway.yaml).")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option("--redis-url", help="The Redis flag store's URL.")
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why, for the audit.")] = "",
) -> None:
    """Delete the whole flag store (flags, rollout states, guard and shadow counts) for good."""
    from gateway.flagstore.redis import RedisStore
    from gateway.settings import load_settings

    if not yes:
        typer.echo(
            "refusing: this deletes every flag, rollout state and count in the store, and "
            "the replicas will not restore them; run again with --yes to do it",
            err=True,
        )
        raise typer.Exit(2)
    try:
        settings = load_settings(config, overrides={"store.url": redis_url})
    except GatewayError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    actor = f"cli:{getpass.getuser()}@{socket.gethostname()}"

    async def run() -> int:
        store = RedisStore(settings.store.url, prefix=settings.store.prefix)
        try:
            return await store.reset(actor=actor, reason=reason)
        finally:
            await store.close()

    try:
        deleted = asyncio.run(run())
    except GatewayError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"store {settings.store.prefix!r} reset: {deleted} key(s) deleted, new generation")
