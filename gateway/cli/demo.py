"""`gateway demo`: the one-command first run (DESIGN 8), `make demo`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from gateway.cli import app


@app.command()
def demo(
    duration: Annotated[
        float, typer.Option("--duration", min=5.0, help="Seconds of traffic.")
    ] = 60.0,
    canary_error_rate: Annotated[
        float,
        typer.Option(
            "--canary-error-rate", min=0.0, max=1.0, help="Share of canary answers that fail."
        ),
    ] = 0.3,
    degrade_after: Annotated[
        float | None,
        typer.Option(
            "--degrade-after",
            min=0.0,
            help="Seconds until the canary degrades [default: a third of --duration].",
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option("--redis-url", help="Use the Redis flag store (a fresh key prefix per run)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds users, bodies and failures.")] = 0,
    llm: Annotated[
        bool,
        typer.Option(
            "--llm", help="An LLM canary (OpenAI API, streams) whose time to first token regresses."
        ),
    ] = False,
) -> None:
    """Run a stable and a canary model server, a shadow, the gateway and traffic; watch the
    canary ramp, degrade and get rolled back by the guard. Exit 0 when that happened."""
    if llm:
        _llm_demo(duration, degrade_after, seed)
        return
    if degrade_after is not None and degrade_after >= duration:
        raise typer.BadParameter(
            f"must be shorter than --duration ({degrade_after:g} >= {duration:g}): the canary "
            "would never degrade",
            param_hint="--degrade-after",
        )
    if redis_url is not None:
        _require_redis_store()
    # Imported here so other `gateway` verbs do not pay for uvicorn, aiohttp and rich.
    import uvloop

    from gateway.demo.canary import DemoOptions, run_demo
    from gateway.demo.view import view_for
    from gateway.errors import GatewayError

    options = DemoOptions(duration, canary_error_rate, degrade_after, redis_url, seed)
    try:
        report = uvloop.run(run_demo(options, view_for(sys.stdout)))
    except (GatewayError, OSError) as exc:
        typer.echo(f"gateway demo: {exc}", err=True)
        raise typer.Exit(1) from exc
    raise typer.Exit(0 if report["ok"] else 1)


def _require_redis_store() -> None:
    try:
        import gateway.flagstore.redis  # noqa: F401
    except ImportError as exc:
        typer.echo(
            f"gateway demo: --redis-url needs the Redis flag store, which cannot be loaded "
            f"here ({exc}); run the demo without --redis-url to use the embedded store",
            err=True,
        )
        raise typer.Exit(2) from exc


def _llm_demo(duration: float, degrade_after: float | None, seed: int) -> None:
    import uvloop

    from gateway.demo.llm import LlmDemoOptions, run_llm_demo

    options = LlmDemoOptions(duration, degrade_after, seed)
    summary = uvloop.run(run_llm_demo(options, typer.echo))
    raise typer.Exit(0 if summary["ok"] else 1)
