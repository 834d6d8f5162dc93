"""Serving a bundled demo server (the model server, the OpenAI-style server) with uvicorn."""

from __future__ import annotations

from typing import Any

# A request the demo servers hold open on purpose (/_stall) never ends by itself: shutdown
# waits this long for it, then closes it (uvicorn takes whole seconds).
GRACEFUL_SHUTDOWN_S = 2


def serve_app(app: Any, *, host: str, port: int, log_level: str = "warning") -> None:
    """Serve the ASGI `app` on host:port until SIGINT/SIGTERM (uvloop, httptools, no access
    log, lifespan on)."""
    import uvicorn  # the apps themselves do not need uvicorn; only serving does

    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
