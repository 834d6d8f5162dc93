"""`gateway serve`: run the gateway (DESIGN 8 "Settings and commands")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

import typer

from gateway.build import client_choice, package_version, server_choice
from gateway.cli import app
from gateway.errors import FieldError, InvalidDocument
from gateway.flagstore import read_flags_file
from gateway.settings import Settings

log = logging.getLogger("gateway.serve")


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
    from gateway.control.pairlog import configure_pair_log
    from gateway.dataplane.server import run
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
        count = _check_flags_file(settings)
    except InvalidDocument as exc:
        for err in exc.errors:
            typer.echo(str(err), err=True)
        raise typer.Exit(1) from exc
    log.info("%s", startup_line(settings, count))
    if settings.workers > 1:
        from gateway.dataplane.workers import supervise

        raise typer.Exit(supervise(settings))
    configure_pair_log(settings.shadow.pair_log)
    try:
        run(create_app(settings))
    except (InvalidDocument, OSError) as exc:  # e.g. a port in use, a file gone since the check
        typer.echo(f"gateway serve: cannot start: {exc}", err=True)
        raise typer.Exit(1) from None


def _check_flags_file(settings: Settings) -> int | None:
    """The flags file's flag count, or InvalidDocument with every problem as `file: path: ...`.

    Checked before anything starts, so a bad file is a list of problems and exit 1 rather than
    a failed start-up deep in the server. None when there is no file to read (the Redis store
    needs none)."""
    path = settings.store.flags_file
    if not path or (settings.store.kind != "memory" and not Path(path).is_file()):
        return None
    try:
        return len(read_flags_file(path))
    except InvalidDocument as exc:
        errors = [
            e if e.path == str(path) else FieldError(f"{path}: {e.path}", e.message)
            for e in exc.errors
        ]
        raise InvalidDocument(errors) from None


def startup_line(settings: Settings, flags: int | None) -> str:
    """One line with what an operator checks first: where it listens, which store, how many
    flags, which server and client."""
    store = settings.store
    where = "" if store.kind == "memory" else f" ({_redacted(store.url)})"
    counted = "no flags file" if flags is None else f"{flags} flag(s) in {store.flags_file}"
    return (
        f"gateway {package_version()}: data {settings.listen.host}:{settings.listen.port}, "
        f"admin {settings.admin.host}:{settings.admin.port}, store {store.kind}{where}, "
        f"{counted}, server {server_choice(settings)}, client {client_choice(settings)}, "
        f"workers {settings.workers}"
    )


def _redacted(url: str) -> str:
    """A Redis URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urlunsplit(parts._replace(netloc=netloc))


def _default_config() -> Path | None:
    path = Path("config/gateway.yaml")
    return path if path.is_file() else None
