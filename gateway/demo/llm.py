"""`gateway demo --llm`: an LLM canary whose time to first token regresses, rolled back live.

One process, nothing else to install: two bundled OpenAI-compatible model servers
(`gateway.demo.openai_server`) stand for two versions of one vLLM deployment; the flag routes the
body's `"model": "llama"` and sends each arm its own model name; the guard counts a stream whose
first event takes over 500 ms as an error (`ttft_over:500`). Part way through, the canary's TTFT
goes from 100 ms to 800 ms, and the guard rolls it back. A line per second shows the weight, the
guard and the TTFT each arm's streams saw at the client; a summary closes the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from gateway.admin.rollout_api import status_of
from gateway.app import create_app
from gateway.demo.canary import DemoOptions, Servers, demo_settings
from gateway.demo.openai_server import OpenAIServer, OpenAIServerConfig

FLAG = "chat"
MODEL = "llama"
TTFT_LIMIT = "ttft_over:500"
STABLE_TTFT_MS, CANARY_TTFT_MS = 100.0, 800.0
CONCURRENCY = 24


@dataclass(frozen=True, slots=True)
class LlmDemoOptions:
    duration_s: float = 40.0
    degrade_after_s: float | None = None  # default: a third of the duration
    seed: int = 0

    @property
    def degrade_at_s(self) -> float:
        return self.duration_s / 3 if self.degrade_after_s is None else self.degrade_after_s


class RegressingCanary:
    """The canary's server: the healthy config until `degrade_at`, the slow one after."""

    def __init__(self, healthy: OpenAIServer, slow: OpenAIServer) -> None:
        self.healthy, self.slow = healthy, slow
        self.degrade_at = float("inf")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = self.slow if time.time() >= self.degrade_at else self.healthy
        await app(scope, receive, send)


def flags_document(stable: str, canary: str, *, hold_s: float) -> dict[str, Any]:
    return {
        "flags": [
            {
                "key": FLAG,
                "route": {"path_prefix": "/v1", "model": MODEL},
                "unit": {"from": "body", "name": "/user"},
                "stable": {"name": "v1", "upstream": stable, "model": "llama-3.1-8b"},
                "canary": {"name": "v2", "upstream": canary, "model": "llama-3.1-8b-v2"},
                "schedule": {
                    "kind": "step",
                    "steps": [{"weight": 0.2, "hold": hold_s}, {"weight": 0.5, "hold": "1h"}],
                },
                "guard": {"errors": ["status_5xx", "stream_aborted", TTFT_LIMIT]},
            }
        ]
    }


class StreamTraffic:
    """Streamed chat completions from many users, CONCURRENCY at a time."""

    def __init__(self, url: str, *, seed: int) -> None:
        self._url = f"{url}/v1/chat/completions"
        self._rng = random.Random(seed)
        self.ttft_ms: dict[str, list[float]] = defaultdict(list)
        self.failed: dict[str, int] = defaultdict(int)

    async def run(self, deadline: float) -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._worker(session, deadline) for _ in range(CONCURRENCY)))

    async def _worker(self, session: aiohttp.ClientSession, deadline: float) -> None:
        while time.monotonic() < deadline:
            user = f"user-{self._rng.randrange(5000)}"
            body = {"model": MODEL, "stream": True, "user": user, "max_tokens": 8,
                    "messages": [{"role": "user", "content": "Hello"}]}  # fmt: skip
            started = time.perf_counter()
            variant = "?"
            try:
                async with session.post(self._url, data=orjson.dumps(body)) as response:
                    variant = response.headers.get("x-gateway-variant", "?")
                    first = None
                    async for _ in response.content.iter_any():
                        first = first or time.perf_counter()
                    if first is not None:
                        self.ttft_ms[variant].append((first - started) * 1000.0)
            except aiohttp.ClientError:
                self.failed[variant] += 1


def _p50(values: list[float]) -> str:
    return f"{sorted(values)[len(values) // 2]:.0f}" if values else "-"


async def run_llm_demo(options: LlmDemoOptions, say: Callable[[str], None]) -> dict[str, Any]:
    """Run the LLM demo, narrate it line by line through `say`, and return the summary."""
    seed = options.seed
    models, front = Servers(), Servers()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(models.stop)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-llm-demo-")))

        def server(name: str, ttft_ms: float) -> OpenAIServer:
            config = OpenAIServerConfig(name, ttft_ms=ttft_ms, tokens_per_s=80.0, seed=seed)
            return OpenAIServer(config)

        canary = RegressingCanary(server("vllm-v2", STABLE_TTFT_MS), server("vllm-v2", 800.0))
        hold_s = max(options.degrade_at_s / 2, 1.0)
        doc = flags_document(
            await models.start(server("vllm-v1", STABLE_TTFT_MS)),
            await models.start(canary),
            hold_s=hold_s,
        )
        (tmp / "flags.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        gateway = create_app(demo_settings(DemoOptions(), tmp / "flags.yaml"))
        await stack.enter_async_context(gateway.running())
        stack.push_async_callback(front.stop)
        url = await front.start(gateway.data_app)
        t0 = time.time()
        canary.degrade_at = t0 + options.degrade_at_s
        say(f"gateway on {url}/v1 (OpenAI API, model {MODEL!r}); stable TTFT "
            f"{STABLE_TTFT_MS:.0f} ms; canary TTFT -> {CANARY_TTFT_MS:.0f} ms at "
            f"{options.degrade_at_s:.0f} s; guard errors include {TTFT_LIMIT}")  # fmt: skip
        traffic = StreamTraffic(url, seed=seed)
        driving = asyncio.create_task(traffic.run(time.monotonic() + options.duration_s))
        while not driving.done():
            await asyncio.wait({driving}, timeout=1.0)
            say(_line(status_of(gateway, FLAG), traffic, time.time() - t0))
        status: dict[str, Any] = status_of(gateway, FLAG)
    guard = status.get("guard") or {}
    kinds = guard.get("error_kinds", {})
    ok = status["state"] == "rolled_back" and TTFT_LIMIT in kinds and not traffic.failed
    summary = {
        "ok": ok,
        "state": status["state"],
        "reason": status.get("reason"),
        "error_kinds": kinds,
        "ttft_p50_ms": {v: _p50(t) for v, t in sorted(traffic.ttft_ms.items())},
        "streams": {v: len(t) for v, t in sorted(traffic.ttft_ms.items())},
        "failed_streams": dict(traffic.failed),
    }
    say(f"summary: {orjson.dumps(summary).decode()}")
    return summary


def _line(status: dict[str, Any], traffic: StreamTraffic, t: float) -> str:
    guard = status.get("guard") or {}
    ttft = " ".join(f"{v}:{_p50(values[-50:])}ms" for v, values in sorted(traffic.ttft_ms.items()))
    return (
        f"{t:5.1f}s  {status['state']:<11} weight {status['weight']:.2f}  "
        f"guard n={guard.get('n', 0)} k={guard.get('k', 0)} llr={guard.get('llr', 0):.2f} "
        f"A={guard.get('A', 0):.2f} {guard.get('error_kinds', {})}  TTFT p50 {ttft}"
    )
