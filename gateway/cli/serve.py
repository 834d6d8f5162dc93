"""`gateway serve`: run the gateway (DESIGN 8 "Settings and commands")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli import app
from gateway.errors import InvalidDocument


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", help="Settings file (config/gateway.yaml).")
    ] = None,
    flags: Annotated[Path | None, typer.Option("--flags", help="Flags file.")] = None,
    redis_url: Annotated[
        str | None, typer.Option("--redis-url", help="Use the Redis flag store at this URL.")
    ] = None,
    host: Annotated[str | None, typer.Option("--host")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Data-plane port (8080).")] = None,
    admin_host: Annotated[
        str | None,
        typer.Option("--admin-host", help="Admin API address; keep it off public networks."),
    ] = None,
    admin_port: Annotated[
        int | None, typer.Option("--admin-port", help="Admin API and /metrics port (9090).")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Serve the data plane on --port and the admin API and /metrics on --admin-port."""
    from gateway.app import create_app
    from gateway.pairlog import configure_pair_log
    from gateway.server import run
    from gateway.settings import load_settings

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict[str, object] = {
        "store.flags_file": str(flags) if flags else None,
        "listen.host": host,
        "listen.port": port,
        "admin.host": admin_host,
        "admin.port": admin_port,
        "workers": workers,
    }
    if redis_url:
        overrides |= {"store.kind": "redis", "store.url": redis_url}
    config_path = config if config is not None else _default_config()
    try:
        settings = load_settings(config_path, overrides=overrides)
    except InvalidDocument as exc:
        for err in exc.errors:
            typer.echo(str(err), err=True)
        raise typer.Exit(1) from exc
    if settings.workers > 1:
        from gateway.workers import supervise

        raise typer.Exit(supervise(settings))
    configure_pair_log(settings.shadow.pair_log)
    run(create_app(settings))


def _default_config() -> Path | None:
    path = Path("config/gateway.yaml")
    return path if path.is_file() else None
