"""`gateway demo`: a canary rollout, the canary's degradation and the guard's rollback, live.

Everything runs on one event loop in one process, with nothing else to install: three bundled
model servers (stable v1; canary v2, wrapped so that it starts failing part way; shadow v3,
which scores a little higher) as uvicorn servers on free loopback ports, a real `Gateway` in
front of them (the embedded store, or Redis with `--redis-url`), and an open-loop traffic
driver with many distinct users. A watcher samples the gateway's own status document and
Prometheus registry for the view (`gateway.demo.view`) and builds the closing report.

The report is honest by construction: request counts come from `gateway_requests_total` in the
gateway's registry and are checked against what the driver received and what the canary itself
answered; the rollback time is the guard's audited decision; the canary requests "until the
rollback" are counted by the canary's own wrapper, not inferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import socket
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvicorn
import yaml

from gateway.admin.rollout_api import status_of
from gateway.app import Gateway, create_app
from gateway.demo.modelserver import ModelServer, ModelServerConfig, Receive, Scope, Send
from gateway.demo.view import Event, Frame, View
from gateway.settings import Settings, load_settings

FLAG = "sentiment"
PATH = "/v1/sentiment"
USERS = 2000
RATE = 150.0  # requests per second offered by the driver
CONCURRENCY = 32  # requests in flight at most
SHADOW_SAMPLE = 0.25
SHADOW_OFFSET = 0.05  # v3 scores this much higher than v1 and v2 on average
RAMP = (0.10, 0.25, 0.50)  # the last step holds for an hour: the demo never promotes
SAMPLE_EVERY_S = 0.25


@dataclass(frozen=True, slots=True)
class DemoOptions:
    duration_s: float = 60.0
    canary_error_rate: float = 0.3
    degrade_after_s: float | None = None  # default: a third of the duration
    redis_url: str | None = None
    seed: int = 0

    @property
    def degrade_at_s(self) -> float:
        return self.duration_s / 3 if self.degrade_after_s is None else self.degrade_after_s

    @property
    def hold_s(self) -> float:
        # Two short holds put the first two steps before the degradation; a step also waits for
        # the guard's evidence (56 clean canary answers), which takes ~4 s at 10 % of 150 req/s.
        return max(self.degrade_at_s / 4, 0.5)


# --- the canary and the traffic ------------------------------------------------------------


class DegradingCanary:
    """The canary's model server, answering 500 with probability `error_rate` once degraded.

    It is also the honest count of what the canary saw: every request's arrival time and
    every failing answer's time, as the canary itself experienced them.
    """

    def __init__(self, app: ModelServer, *, error_rate: float, seed: int) -> None:
        self._app = app
        self._error_rate = error_rate
        self._draws = random.Random(f"{seed}:canary")
        self._body = orjson.dumps({"model": app.config.name, "error": "degraded"})
        self.degrade_at = float("inf")
        self.requests = 0
        self.arrivals_degraded: list[float] = []
        self.errors: list[float] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        now = time.time()
        self.requests += 1
        if now < self.degrade_at:
            await self._app(scope, receive, send)
            return
        self.arrivals_degraded.append(now)
        if self._draws.random() >= self._error_rate:
            await self._app(scope, receive, send)
            return
        while (await receive()).get("more_body", False):
            pass
        headers = [(b"content-type", b"application/json"), (b"x-model", b"v2")]
        headers.append((b"content-length", str(len(self._body)).encode()))
        self.errors.append(time.time())
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        await send({"type": "http.response.body", "body": self._body})


class Traffic:
    """Open-loop load: `RATE` requests/s from `USERS` users, at most `CONCURRENCY` in flight."""

    def __init__(self, url: str, *, seed: int) -> None:
        self._url = url
        self._rng = random.Random(f"{seed}:traffic")
        self.answers: Counter[tuple[str, int]] = Counter()  # (x-gateway-variant, status)
        self.failures = 0  # requests that got no HTTP answer at all
        self.users: set[str] = set()
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    async def run(self, deadline: float) -> None:
        """Send until `deadline` (monotonic) or `stop()`, then wait for the answers."""
        gate = asyncio.Semaphore(CONCURRENCY)
        in_flight: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            next_at, i = time.monotonic(), 0
            while not self._stopping and time.monotonic() < deadline:
                await gate.acquire()
                user = f"user-{self._rng.randrange(USERS)}"
                body = orjson.dumps({"text": f"review {i} by {user}", "stars": i % 5 + 1})
                task = asyncio.create_task(self._one(session, user, body, gate))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                i += 1
                # A fixed schedule, not a fixed pause: a slow answer does not slow the offer.
                next_at = max(next_at + 1 / RATE, time.monotonic() - 1.0)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if in_flight:
                await asyncio.wait(in_flight)

    async def _one(
        self, session: aiohttp.ClientSession, user: str, body: bytes, gate: asyncio.Semaphore
    ) -> None:
        headers = {"x-user-id": user, "content-type": "application/json"}
        self.users.add(user)
        try:
            async with session.post(self._url, data=body, headers=headers) as response:
                await response.read()
                variant = response.headers.get("x-gateway-variant", "-")
                self.answers[(variant, response.status)] += 1
        except (aiohttp.ClientError, TimeoutError):
            self.failures += 1
        finally:
            gate.release()


# --- servers on one loop -------------------------------------------------------------------


class _Server(uvicorn.Server):
    """Signals belong to the demo (Ctrl-C ends it early, with a summary), not to uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Servers:
    """In-process uvicorn servers on loopback sockets the kernel picked (no port races)."""

    def __init__(self) -> None:
        self._running: list[tuple[_Server, asyncio.Task[None]]] = []

    async def start(self, app: Any) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, lifespan="off", loop="none", http="httptools",
            access_log=False, log_level="warning", server_header=False, date_header=False,
            timeout_graceful_shutdown=2,
        )  # fmt: skip
        server = _Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        self._running.append((server, task))
        while not server.started:
            if task.done():
                raise RuntimeError(f"a demo server did not start on port {port}")
            await asyncio.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        for server, _ in self._running:
            server.should_exit = True
        await asyncio.gather(*(task for _, task in self._running), return_exceptions=True)
        self._running.clear()


# --- the gateway under demonstration -------------------------------------------------------


def flags_document(stable: str, canary: str, shadow: str, *, hold_s: float) -> dict[str, Any]:
    steps = [{"weight": w, "hold": hold_s} for w in RAMP[:-1]] + [
        {"weight": RAMP[-1], "hold": "1h"}
    ]
    flag = {
        "key": FLAG,
        "route": {"path_prefix": PATH},
        "unit": {"from": "header", "name": "x-user-id"},
        "stable": {"name": "v1", "upstream": stable},
        "canary": {"name": "v2", "upstream": canary},
        "schedule": {"kind": "step", "steps": steps},
        "on_canary_error": "pass",
        "shadows": [
            {"name": "v3", "upstream": shadow, "sample": SHADOW_SAMPLE, "metric": "json:/score"}
        ],
    }
    return {"flags": [flag]}


def demo_settings(options: DemoOptions, flags_file: Path) -> Settings:
    overrides: dict[str, Any] = {
        "listen.host": "127.0.0.1",
        "admin.host": "127.0.0.1",
        "store.flags_file": str(flags_file),
        "shutdown_grace_s": 2.0,
    }
    if options.redis_url:
        # A prefix of its own: a demo never meets an earlier run's flag or rollout state.
        overrides |= {"store.kind": "redis", "store.url": options.redis_url,
                      "store.prefix": f"gw-demo-{uuid.uuid4().hex[:12]}"}  # fmt: skip
    return load_settings(None, env={}, overrides=overrides)


def request_counts(gateway: Gateway) -> dict[str, dict[str, int]]:
    """gateway_requests_total of the demo's flag: variant -> status code -> count."""
    out: dict[str, dict[str, int]] = {}
    for family in gateway.metrics.requests.collect():
        for s in family.samples:
            if s.name == "gateway_requests_total" and s.labels["flag"] == FLAG:
                codes = out.setdefault(s.labels["variant"], {})
                codes[s.labels["code"]] = int(s.value)
    return out


def metric_values(gateway: Gateway, name: str, *labels: str) -> dict[str, float]:
    """One metric of the demo's flag from the registry, keyed by the given labels' values."""
    out: dict[str, float] = {}
    for family in gateway.registry.collect():
        for s in family.samples:
            if s.name == name and s.labels.get("flag") == FLAG:
                out["/".join(s.labels[label] for label in labels)] = s.value
    return out


@contextlib.contextmanager
def gateway_logs(sink: Callable[[tuple[float, str]], None]) -> Iterator[None]:
    """The gateway's warnings (the guard's verdict among them) become demo events."""

    class ToEvents(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = f"{record.name}: {record.getMessage()}"
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                text += f" ({type(exc).__name__}: {exc})"
            sink((record.created, text))

    logger = logging.getLogger("gateway")
    handler = ToEvents(logging.WARNING)
    saved = logger.handlers[:], logger.propagate
    logger.handlers[:] = [handler]
    logger.propagate = False  # pair lines and the rest stay out of the terminal
    try:
        yield
    finally:
        logger.handlers[:], logger.propagate = saved


# --- watching it happen --------------------------------------------------------------------


@dataclass(slots=True)
class Watcher:
    """Samples the gateway for the view and notes the moments the summary reports."""

    gateway: Gateway
    canary: DegradingCanary
    view: View
    t0: float  # wall-clock start of the rollout: t = 0 everywhere in the demo
    logged: list[tuple[float, str]] = field(default_factory=list)  # warnings not yet shown
    ramp: list[dict[str, Any]] = field(default_factory=list)
    history: deque[tuple[float, dict[str, dict[str, int]]]] = field(
        default_factory=lambda: deque(maxlen=16)
    )
    warnings: Counter[str] = field(default_factory=Counter)  # each shown once, then counted
    state: str = "running"
    degraded_seen: bool = False
    first_error_seen: bool = False
    rollback_seen: bool = False

    def note(self, text: str, at: float | None = None) -> None:
        self.view.event(Event((time.time() if at is None else at) - self.t0, text))

    def sample(self) -> Frame:
        now = time.time()
        status = status_of(self.gateway, FLAG)
        counts = request_counts(self.gateway)
        self._notice(status, now)
        self.history.append((now, counts))
        # Rates over the last second: against the oldest sample at most ~1 s old.
        then, before = next(h for h in self.history if now - h[0] <= 1.05)
        span = now - then
        rates: dict[str, float] = {}
        error_rates: dict[str, float | None] = {}
        for variant in ("v1", "v2"):
            now_codes, then_codes = counts.get(variant, {}), before.get(variant, {})
            done = sum(now_codes.values()) - sum(then_codes.values())
            rates[variant] = done / span if span > 0 else 0.0
            bad = _server_errors(now_codes) - _server_errors(then_codes)
            error_rates[variant] = bad / done if done else None
        served = {v: sum(codes.values()) for v, codes in counts.items()}
        return Frame(now - self.t0, status, rates, error_rates, served)

    def _notice(self, status: dict[str, Any], now: float) -> None:
        self.state = status["state"]
        while self.logged:
            at, text = self.logged.pop(0)
            self.warnings[text] += 1
            if self.warnings[text] == 1:
                self.note(text, at)
        rollout = self.gateway.controller.rollout(FLAG)
        step = status.get("step")
        if rollout is not None and isinstance(step, int) and len(self.ramp) <= step:
            at = rollout.started_at + rollout.step_started
            self.ramp.append({"step": step, "weight": RAMP[step], "at_s": round(at - self.t0, 3)})
            self.note(f"ramp: step {step + 1}/{len(RAMP)}, canary weight {RAMP[step]:.0%}", at)
        if not self.degraded_seen and now >= self.canary.degrade_at:
            self.degraded_seen = True
            self.note("canary v2 degrades: from now on it fails requests", self.canary.degrade_at)
        if not self.first_error_seen and self.canary.errors:
            self.first_error_seen = True
            self.note("canary v2 answers its first 500", self.canary.errors[0])

    async def notice_rollback(self) -> None:
        if self.rollback_seen or self.state != "rolled_back":
            return
        self.rollback_seen = True
        rb = await _rollback(self.gateway, self.canary, self.t0)
        if rb["happened"]:
            self.note(
                f"canary closed ({rb['reason']}) after {rb['canary_requests_before']} canary "
                f"requests since degrading ({rb['canary_errors_before']} failed), "
                f"{rb['delay_ms']:.0f} ms after its first 500",
                rb["at"],
            )


def _server_errors(codes: dict[str, int]) -> int:
    return sum(n for code, n in codes.items() if code.startswith("5"))


async def _follow(watcher: Watcher, driving: asyncio.Task[None]) -> None:
    while not driving.done():
        watcher.view.frame(watcher.sample())
        await watcher.notice_rollback()
        await asyncio.wait({driving}, timeout=SAMPLE_EVERY_S)


async def _settle(gateway: Gateway) -> None:
    """Let the gateway record every answer and pair every mirrored request."""
    for _ in range(250):
        if gateway.proxy.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    await gateway.mirror.drain(timeout_s=5.0)
    await gateway.counter_sync.flush()  # the shadow test then includes every pair


@contextlib.contextmanager
def _interruptible(traffic: Traffic) -> Iterator[list[bool]]:
    """Ctrl-C (or SIGTERM) stops the traffic; the demo still settles and reports."""
    loop, interrupted = asyncio.get_running_loop(), [False]

    def stop() -> None:
        interrupted[0] = True
        traffic.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        yield interrupted
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_demo(options: DemoOptions, view: View) -> dict[str, Any]:
    """Run the whole demo, show it on `view`, and return the report the summary shows."""
    models, front = Servers(), Servers()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(models.stop)  # exits run in reverse: front, gateway, models
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-demo-")))
        seed = options.seed
        canary = DegradingCanary(
            ModelServer(_model("v2", seed=seed * 10 + 2)),
            error_rate=options.canary_error_rate,
            seed=seed,
        )
        doc = flags_document(
            await models.start(ModelServer(_model("v1", seed=seed * 10 + 1))),
            await models.start(canary),
            await models.start(ModelServer(_model("v3", seed=seed * 10 + 3, offset=SHADOW_OFFSET))),
            hold_s=options.hold_s,
        )
        (tmp / "flags.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        gateway = create_app(demo_settings(options, tmp / "flags.yaml"))
        logged: list[tuple[float, str]] = []
        stack.enter_context(gateway_logs(logged.append))
        if options.redis_url:  # after the gateway stops: leave the user's Redis as it was
            stack.push_async_callback(_forget_prefix, options.redis_url, gateway.settings)
        await stack.enter_async_context(gateway.running())
        stack.push_async_callback(front.stop)
        url, admin = await front.start(gateway.data_app), await front.start(gateway.admin_app)
        t0 = _started_at(gateway)
        canary.degrade_at = t0 + options.degrade_at_s
        view.start(_header(options, gateway, url + PATH, admin + "/metrics"))
        watcher = Watcher(gateway, canary, view, t0, logged)
        traffic = Traffic(url + PATH, seed=seed)
        deadline = time.monotonic() + options.duration_s - (time.time() - t0)
        with _interruptible(traffic) as interrupted:
            driving = asyncio.create_task(traffic.run(deadline))
            await _follow(watcher, driving)
            await driving
            await _settle(gateway)
            last = watcher.sample()
        view.frame(last)
        report = await build_report(options, watcher, traffic, last, interrupted=interrupted[0])
    view.finish(report)
    return report


async def _forget_prefix(url: str, settings: Settings) -> None:
    """Delete this run's keys (all under its own prefix, one hash tag: `{prefix}:...`).

    Best effort: when Redis is away there is nothing to clean, and its error is reported already.
    """
    from redis.exceptions import RedisError

    from gateway.flagstore.redis import connect

    client = connect(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{{{settings.store.prefix}}}:*")]
        if keys:
            await client.delete(*keys)
    except (RedisError, OSError):
        pass
    finally:
        await client.aclose()


def _model(name: str, *, seed: int, offset: float = 0.0) -> ModelServerConfig:
    # A few milliseconds of model time, so requests overlap as they do in production.
    return ModelServerConfig(name, latency_ms=4.0, jitter_ms=2.0, score_offset=offset, seed=seed)


def _header(options: DemoOptions, gateway: Gateway, url: str, metrics: str) -> dict[str, Any]:
    guard = gateway.router.by_key[FLAG].guard
    assert guard is not None
    bounds = guard.bounds
    alpha = guard.config.alpha
    return {
        **asdict(options),
        "t0": _started_at(gateway),
        "degrade_at_s": options.degrade_at_s,
        "hold_s": options.hold_s,
        "url": url,
        "metrics_url": metrics,
        "store": gateway.store.kind,
        "ramp": list(RAMP),
        "rate": RATE,
        "users": USERS,
        "guard": {
            "A": bounds.a(1),
            "A2": bounds.a(2),
            "B": bounds.B,
            "e0": bounds.e0,
            "e1": bounds.e1,
            "alpha": alpha,
        },
        "shadow_sample": SHADOW_SAMPLE,
    }


# --- the report ----------------------------------------------------------------------------


async def build_report(
    options: DemoOptions, watcher: Watcher, traffic: Traffic, last: Frame, *, interrupted: bool
) -> dict[str, Any]:
    """The summary's figures, each from its honest source, and the checks that tie them."""
    gateway, canary = watcher.gateway, watcher.canary
    counts = request_counts(gateway)
    served = {v: sum(codes.values()) for v, codes in counts.items()}
    answered: Counter[str] = Counter()
    for (variant, _), n in traffic.answers.items():
        answered[variant] += n
    user_errors = traffic.failures + sum(n for (_, s), n in traffic.answers.items() if s >= 500)
    rollback = await _rollback(gateway, canary, watcher.t0)
    checks = [
        _check("gateway_requests_total per variant equals what the users received",
               served == dict(answered), f"metrics {served}, users {dict(answered)}"),
        _check("every request was answered", traffic.failures == 0,
               f"{traffic.failures} requests got no HTTP answer"),
        _check("the canary's own count equals gateway_requests_total{variant=v2}",
               canary.requests == served.get("v2", 0),
               f"canary {canary.requests}, metrics {served.get('v2', 0)}"),
        _check("user-visible errors equal the canary's 5xx answers (on_canary_error: pass)",
               user_errors == len(canary.errors) == _server_errors(counts.get("v2", {}))
               and _server_errors(counts.get("v1", {})) == 0,
               f"users saw {user_errors}, canary answered {len(canary.errors)} 500s, metrics "
               f"v2 5xx {_server_errors(counts.get('v2', {}))}, v1 5xx "
               f"{_server_errors(counts.get('v1', {}))}"),
    ]  # fmt: skip
    degraded = canary.arrivals_degraded != []
    rolled_back = rollback["happened"] and rollback["reason"] == "sprt"
    after_degrading = rolled_back and rollback["at"] >= canary.degrade_at
    return {
        "ok": bool(degraded and after_degrading and all(c["ok"] for c in checks)),
        "interrupted": interrupted,
        "options": {**asdict(options), "degrade_at_s": options.degrade_at_s},
        "store": gateway.store.kind,
        "ran_s": round(last.t, 3),
        "requests": {
            "total": sum(answered.values()) + traffic.failures,
            "by_variant": dict(answered),
            "no_answer": traffic.failures,
            "user_visible_errors": user_errors,
            "distinct_users": len(traffic.users),
        },
        "metrics": {
            "gateway_requests_total": counts,
            "by_variant": served,
            "total": sum(served.values()),
            "gateway_rollbacks_total": metric_values(gateway, "gateway_rollbacks_total", "reason"),
            "gateway_shadow_requests_total": metric_values(
                gateway, "gateway_shadow_requests_total", "shadow", "outcome"
            ),
        },
        "ramp": watcher.ramp,
        "canary": {
            "requests": canary.requests,
            "errors": len(canary.errors),
            "degraded_at_s": round(canary.degrade_at - watcher.t0, 3),
            "requests_since_degrading": len(canary.arrivals_degraded),
            "first_error_at_s": _since(canary.errors[0], watcher.t0) if canary.errors else None,
        },
        "rollback": {k: v for k, v in rollback.items() if k != "at"},
        "state": last.status["state"],
        "gateway_warnings": dict(watcher.warnings),
        "shadow": _shadow(last.status),
        "checks": checks,
    }


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail}


def _since(ts: float, t0: float) -> float:
    return round(ts - t0, 3)


async def _rollback(gateway: Gateway, canary: DegradingCanary, t0: float) -> dict[str, Any]:
    """The guard's audited decision, and what the canary saw before and after it."""
    events = [e for e in await gateway.store.audit(flag=FLAG) if e.action == "rollback"]
    if not events:
        return {"happened": False}
    decision = events[-1]  # newest first: the earliest rollback of this run
    at = decision.ts
    first_error = canary.errors[0] if canary.errors else None
    return {
        "happened": True,
        "at": at,
        "reason": decision.reason,
        "actor": decision.actor,
        "at_s": _since(at, t0),
        "after_degrading_s": round(at - canary.degrade_at, 3),
        "delay_ms": round((at - first_error) * 1000, 1) if first_error is not None else None,
        "canary_requests_before": sum(1 for t in canary.arrivals_degraded if t <= at),
        "canary_errors_before": sum(1 for t in canary.errors if t <= at),
        # Routed to the canary before the decision, arrived there after it (in flight).
        "canary_requests_in_flight": sum(1 for t in canary.arrivals_degraded if t > at),
        "canary_errors_in_flight": sum(1 for t in canary.errors if t > at),
        "guard": {k: decision.details.get(k) for k in ("n", "k", "llr", "A", "B", "test")},
    }


def _shadow(status: dict[str, Any]) -> dict[str, Any] | None:
    shadows = status.get("shadows") or []
    if not shadows:
        return None
    s = shadows[0]
    keep: tuple[str, ...] = ("shadow", "metric", "n", "mean_diff", "t", "df", "p", "ci95")
    keep += ("p_always_valid", "cs95", "unmeasured", "verdict")
    return {k: s.get(k) for k in keep}


def _started_at(gateway: Gateway) -> float:
    rollout = gateway.controller.rollout(FLAG)
    assert rollout is not None, "the gateway starts the flag's rollout before it is ready"
    return rollout.started_at
