"""The `gateway` command: one typer app, each group of verbs in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="gateway",
    help="Traffic-splitting and canary-rollout gateway for ML model servers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
flags_app = typer.Typer(help="Validate, apply and inspect flags.", no_args_is_help=True)
app.add_typer(flags_app, name="flags")


def _register() -> None:
    # Imported for their side effect of adding commands to `app` / `flags_app`.
    from gateway.cli import demo, model_server, offline, online, rollout, serve  # noqa: F401


def main() -> None:
    _register()
    app()
