"""The `gateway` command: one typer app, each group of verbs in its own module.

Exit codes, for every verb: 0 ok, 1 refused or invalid, 2 bad usage, 3 the admin API
unreachable, 4 a conflict (the flag changed since it was read).
"""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="gateway",
    help="Traffic-splitting and canary-rollout gateway for ML model servers.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
flags_app = typer.Typer(help="Validate, apply and inspect flags.", no_args_is_help=True)
app.add_typer(flags_app, name="flags")


def _show_version(value: bool) -> None:
    if value:
        from gateway.build import package_version

        typer.echo(f"gateway {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Traffic-splitting and canary-rollout gateway for ML model servers."""


def _register() -> None:
    # Imported for their side effect of adding commands to `app` / `flags_app`.
    from gateway.cli import demo, model_server, offline, online, rollout, serve, store  # noqa: F401


def main() -> None:
    _register()
    app()
