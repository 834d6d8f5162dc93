"""`gateway model-server`: the bundled model server for demos, tests and compose."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli import app


@app.command("model-server")
def model_server(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")],
    name: Annotated[str, typer.Option(help="Model name: in every body and in `x-model`.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    error_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of requests answered with 500.")
    ] = 0.0,
    latency_ms: Annotated[float, typer.Option(min=0.0, help="Delay before answering.")] = 0.0,
    jitter_ms: Annotated[
        float, typer.Option(min=0.0, help="Uniform +- jitter added to --latency-ms.")
    ] = 0.0,
    score_offset: Annotated[float, typer.Option(help="Added to every POST score.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seeds the score noise and the error draws.")] = 0,
    access_log: Annotated[
        Path | None, typer.Option(help="Append one JSON line per request to this file.")
    ] = None,
) -> None:
    """Run a fake model: POST scores the body, GET echoes the request (see gateway.modelserver)."""
    # Imported here so other `gateway` verbs do not pay for uvicorn's import.
    from gateway.modelserver import ModelServerConfig, run

    config = ModelServerConfig(
        name=name,
        error_rate=error_rate,
        latency_ms=latency_ms,
        jitter_ms=jitter_ms,
        score_offset=score_offset,
        seed=seed,
        access_log=access_log,
    )
    typer.echo(f"model server {name!r} on http://{host}:{port}", err=True)
    run(config, host=host, port=port)
