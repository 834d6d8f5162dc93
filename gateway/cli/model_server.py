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
    openai: Annotated[
        bool, typer.Option("--openai", help="Speak the OpenAI API: a fake LLM that streams.")
    ] = False,
    tokens_per_s: Annotated[
        float, typer.Option(min=0.001, help="--openai: tokens per second of an answer.")
    ] = 50.0,
    ttft_ms: Annotated[
        float, typer.Option(min=0.0, help="--openai: time to the first streamed event.")
    ] = 50.0,
    completion_tokens: Annotated[
        int, typer.Option(min=1, help="--openai: answer length when max_tokens is not set.")
    ] = 16,
    abort_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="--openai: streams cut mid-answer.")
    ] = 0.0,
    error_event_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="--openai: streams with an SSE error event.")
    ] = 0.0,
    error_hold_ms: Annotated[
        float,
        typer.Option(min=0.0, help="--openai: how long a stream stays open after its error event."),
    ] = 0.0,
    log_tokens: Annotated[
        bool, typer.Option("--log-tokens", help="--openai: log each token before it is sent.")
    ] = False,
    score_fault: Annotated[
        str, typer.Option(help='none, nan (answer "score": "NaN") or missing (no score).')
    ] = "none",
    score_fault_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of POSTs with --score-fault.")
    ] = 1.0,
) -> None:
    """Run a fake model: POST scores the body, GET echoes the request
    (see gateway.demo.modelserver).

    With --openai, a fake LLM on /v1/chat/completions and /v1/completions instead
    (see gateway.demo.openai_server)."""
    if openai:
        from gateway.demo.openai_server import OpenAIServerConfig
        from gateway.demo.openai_server import run as run_openai

        try:
            llm = OpenAIServerConfig(
                name=name,
                tokens_per_s=tokens_per_s,
                ttft_ms=ttft_ms,
                completion_tokens=completion_tokens,
                error_rate=error_rate,
                abort_rate=abort_rate,
                error_event_rate=error_event_rate,
                error_hold_ms=error_hold_ms,
                seed=seed,
                access_log=access_log,
                log_tokens=log_tokens,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        typer.echo(f"OpenAI-compatible model server {name!r} on http://{host}:{port}", err=True)
        run_openai(llm, host=host, port=port)
        return
    # Imported here so other `gateway` verbs do not pay for uvicorn's import.
    from gateway.demo.modelserver import ModelServerConfig, run

    config = ModelServerConfig(
        name=name,
        error_rate=error_rate,
        latency_ms=latency_ms,
        jitter_ms=jitter_ms,
        score_offset=score_offset,
        seed=seed,
        access_log=access_log,
        score_fault=score_fault,  # type: ignore[arg-type]  # checked by ModelServerConfig
        score_fault_rate=score_fault_rate,
    )
    typer.echo(f"model server {name!r} on http://{host}:{port}", err=True)
    run(config, host=host, port=port)
