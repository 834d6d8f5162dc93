"""A bounded soak: does the gateway's memory, fd count or task count grow under steady load?

Usage (a script for a person at a terminal, not for CI):

    .venv/bin/python bench/soak.py                      # 10 minutes at 70 % of the maximum
    .venv/bin/python bench/soak.py --minutes 2          # a quick check that it all works
    .venv/bin/python bench/soak.py --minutes 60 --fraction 0.5 --redis-url redis://127.0.0.1:6379/0

Options: `--minutes M` (10) of paced load at `--fraction F` (0.7) of the measured maximum,
`--concurrency C` (32) requests at most in flight, `--burst-seconds S` (10) to measure the
maximum, `--interval I` (30) seconds between samples, `--redis-url URL` to soak the Redis store
(a private key prefix, deleted afterwards) instead of the embedded one.

What it runs, all on loopback and all its own children (each in its own session), stopped on
exit, on an error, on Ctrl-C and on SIGTERM:

- three `gateway model-server`s: stable v1, canary v2, shadow v3 (another seed and offset);
- `gateway serve` with one flag on `/v1/soak`: the canary at weight 0.2 (held for a day, so it
  neither ramps nor promotes), the default guard, and the shadow sampling 10 % of requests
  with the `json:/score` metric (pair lines go to a file in the temp dir).

Then, in order:

1. the maximum: a `--burst-seconds` closed-loop burst of POSTs with varied `x-user-id`, by
   `wrk -t1 -c32` when wrk is installed, else by an aiohttp loop with 32 connections;
2. the soak: an open-loop schedule at `fraction * maximum` req/s (request i is due at
   `t0 + i / rate`), sent by an aiohttp pacing loop with at most `--concurrency` in flight;
   when the client or the gateway cannot keep up, requests go out late and the `lag` column
   says by how much (a soak wants steady load, not a throughput record);
3. every `--interval` s one line: requests and errors in the interval, the achieved rate,
   latency p50/p99, lag, and the gateway's RSS (VmRSS from /proc/<pid>/status), open fds
   (/proc/<pid>/fd), asyncio tasks and, of those, the ones serving a request or a mirror
   right then (`GET /readyz` on the admin port: `tasks`, `in_flight + mirrors_in_flight`);
4. at the end the totals and the least-squares slopes of RSS (MB/hour), fds and the tasks
   serving no request (per hour; the others come and go with the load), from the first
   interval on (the t=0 sample, right after the burst, only shows where the soak starts) and
   over the second half (early minutes include warm-up: pools filling, allocator arenas
   growing). Ctrl-C during the soak still prints them for the samples taken so far.

Reading it: a flat second-half slope (RSS within a few MB/hour, fds and tasks ~0) is what a
leak-free gateway shows; a steady positive slope in all samples is a leak worth a profile.
Short runs overstate slopes: a 2-minute run checks the machinery, not the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import aiohttp
from processes import Child, Fleet, StartError, free_port

GATEWAY = Path(sys.executable).with_name("gateway")
ROUTE = "/v1/soak"
BODY = b'{"text": "a soak request"}'
USERS = 1000
BURST_CONNECTIONS = 32
CANARY_WEIGHT = 0.2
SHADOW_SAMPLE = 0.1


# --- child processes: bench/processes.py ----------------------------------------------------


def http_ok(port: int, path: str) -> bool:
    """True once the port answers `path` with 200 (the gateway's /readyz says 503 before)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def model_server(fleet: Fleet, name: str, *extra: str) -> Child:
    port = free_port()
    argv = [str(GATEWAY), "model-server", "--port", str(port), "--name", name, *extra]
    return fleet.start(name, argv, port=port, ready=lambda p: http_ok(p, "/_bytes/0"))


@dataclass(frozen=True, slots=True)
class Gateway:
    child: Child
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.child.port}{ROUTE}"

    @property
    def pid(self) -> int:
        return self.child.process.pid


def start_gateway(fleet: Fleet, upstreams: dict[str, Child], redis_url: str | None) -> Gateway:
    workdir = fleet.workdir
    flag = {
        "key": "soak",
        "route": {"path_prefix": ROUTE},
        "stable": {"name": "v1", "upstream": f"http://127.0.0.1:{upstreams['v1'].port}"},
        "canary": {"name": "v2", "upstream": f"http://127.0.0.1:{upstreams['v2'].port}"},
        "schedule": {"kind": "step", "steps": [{"weight": CANARY_WEIGHT, "hold": "24h"}]},
        "shadows": [
            {
                "name": "v3",
                "upstream": f"http://127.0.0.1:{upstreams['v3'].port}",
                "sample": SHADOW_SAMPLE,
                "metric": "json:/score",
            }
        ],
    }
    store: dict[str, object] = {"kind": "memory"}
    if redis_url:
        store = {"kind": "redis", "url": redis_url, "prefix": redis_prefix()}
    settings = {
        "listen": {"host": "127.0.0.1"},
        "admin": {"host": "127.0.0.1"},
        "store": store,
        "shadow": {"pair_log": str(workdir / "pairs.jsonl")},
    }
    (workdir / "flags.json").write_text(json.dumps({"flags": [flag]}))
    (workdir / "gateway.json").write_text(json.dumps(settings))
    port, admin = free_port(), free_port()
    argv = [str(GATEWAY), "serve", "--config", str(workdir / "gateway.json")]
    argv += ["--flags", str(workdir / "flags.json"), "--port", str(port)]
    argv += ["--admin-port", str(admin)]

    def ready(_port: int) -> bool:  # ready when the admin port says so
        return http_ok(admin, "/readyz")

    return Gateway(fleet.start("gateway", argv, port=port, ready=ready), admin)


def redis_prefix() -> str:
    return f"soak-{os.getpid()}"


def forget_redis_keys(redis_url: str) -> None:
    import redis  # only with --redis-url

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{{{redis_prefix()}}}:*"))
    if keys:
        client.delete(*keys)


# --- what the gateway holds ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Vitals:
    t: float  # seconds since the soak began
    rss_mb: float
    fds: int
    tasks: int  # every asyncio task in the gateway
    serving: int  # of which requests and mirrors in flight (one task each)

    @property
    def background(self) -> int:
        """Tasks that serve no request: what a leak would grow."""
        return self.tasks - self.serving


def read_vitals(gw: Gateway, t: float) -> Vitals:
    status = Path(f"/proc/{gw.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    rss_mb = int(match.group(1)) / 1024 if match else float("nan")
    fds = len(os.listdir(f"/proc/{gw.pid}/fd"))
    conn = http.client.HTTPConnection("127.0.0.1", gw.admin_port, timeout=5.0)
    try:
        conn.request("GET", "/readyz")
        ready = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    serving = int(ready["in_flight"]) + int(ready["mirrors_in_flight"])
    return Vitals(t, rss_mb, fds, int(ready["tasks"]), serving)


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 2:
        return float("nan")
    mean_t = statistics.fmean(t for t, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    sxx = sum((t - mean_t) ** 2 for t, _ in points)
    sxy = sum((t - mean_t) * (y - mean_y) for t, y in points)
    return sxy / sxx * 3600 if sxx else float("nan")


# --- load ------------------------------------------------------------------------------------


def wrk_burst(url: str, seconds: int, workdir: Path) -> tuple[float, str]:
    """(requests/s, errors) of a closed-loop wrk burst: POSTs, x-user-id round robin."""
    script = workdir / "soak.lua"
    script.write_text(
        "local requests, i = {}, 0\n"
        "function init(args)\n"
        f"  for n = 1, {USERS} do\n"
        '    requests[n] = wrk.format("POST", nil, {["x-user-id"] = "user-" .. n,\n'
        f'      ["content-type"] = "application/json"}}, {json.dumps(BODY.decode())})\n'
        "  end\n"
        "end\n"
        "function request()\n"
        "  i = i % #requests + 1\n"
        "  return requests[i]\n"
        "end\n"
    )
    argv = ["wrk", "-t1", f"-c{BURST_CONNECTIONS}", f"-d{seconds}s", "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", done.stdout, re.MULTILINE)
    if done.returncode != 0 or rate is None:
        raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    errors = [
        line.strip() for line in done.stdout.splitlines() if "rrors" in line or "Non-2xx" in line
    ]
    return float(rate.group(1)), "; ".join(errors) or "no errors"


async def aiohttp_burst(url: str, seconds: float) -> tuple[float, str]:
    """The same burst without wrk: 32 connections, each as fast as it can."""
    done = errors = 0
    end = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=BURST_CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def loop(w: int) -> None:
            nonlocal done, errors
            i = 0
            while time.monotonic() < end:
                i += 1
                headers = {"x-user-id": f"user-{(w * 7919 + i) % USERS + 1}"}
                try:
                    async with session.post(url, data=BODY, headers=headers) as r:
                        await r.read()
                        errors += r.status >= 400
                except aiohttp.ClientError:
                    errors += 1
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(loop(w) for w in range(BURST_CONNECTIONS)))
    return done / (time.monotonic() - started), f"{errors} errors"


@dataclass(slots=True)
class Window:
    """What the paced load saw since the last sample."""

    done: int = 0
    errors: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    lag_s: float = 0.0  # how late the latest request went out
    keep_latencies: bool = True  # the whole run's window only counts

    def add(self, latency_s: float, outcome: str, lag_s: float) -> None:
        self.done += 1
        if self.keep_latencies:
            self.latencies.append(latency_s)
        self.lag_s = lag_s
        if outcome != "200":
            self.errors += 1
            self.codes[outcome] = self.codes.get(outcome, 0) + 1


@dataclass(slots=True)
class Soak:
    gw: Gateway
    rate: float
    seconds: float
    concurrency: int
    interval_s: float
    samples: list[Vitals] = field(default_factory=list)
    elapsed_s: float = 0.0  # how long the load ran (less than `seconds` when interrupted)
    total: Window = field(default_factory=lambda: Window(keep_latencies=False))
    window: Window = field(default_factory=Window)

    async def run(self) -> None:
        t0 = time.monotonic()
        self.samples.append(read_vitals(self.gw, 0.0))
        print_header()
        print_row(self.samples[-1], Window(), 0.0)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            sampler = asyncio.create_task(self._sample(t0))
            try:
                tickets = iter(range(1 << 62))
                await asyncio.gather(
                    *(self._sender(session, tickets, t0) for _ in range(self.concurrency))
                )
            finally:
                self.elapsed_s = time.monotonic() - t0
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            # While the client's connections are still open, as in every other sample.
            self._take_sample(time.monotonic() - t0, final=True)

    async def _sender(
        self, session: aiohttp.ClientSession, tickets: Iterator[int], t0: float
    ) -> None:
        """Take the next due request from the shared schedule, wait for its time, send it."""
        interval = 1.0 / self.rate
        for i in tickets:
            due = t0 + i * interval
            if due - t0 >= self.seconds:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.monotonic()
            headers = {"x-user-id": f"user-{i % USERS + 1}", "content-type": "application/json"}
            try:
                async with session.post(self.gw.url, data=BODY, headers=headers) as r:
                    await r.read()
                    outcome = str(r.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = type(exc).__name__
            latency = time.monotonic() - sent
            for w in (self.window, self.total):
                w.add(latency, outcome, max(0.0, sent - due))

    async def _sample(self, t0: float) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._take_sample(time.monotonic() - t0)

    def _take_sample(self, t: float, *, final: bool = False) -> None:
        if final and self.samples and t - self.samples[-1].t < 1.0:
            return  # the last periodic sample is the final one
        window, self.window = self.window, Window()
        elapsed = t - self.samples[-1].t if self.samples else t
        self.samples.append(read_vitals(self.gw, t))
        print_row(self.samples[-1], window, elapsed)


# --- output ----------------------------------------------------------------------------------


def print_header() -> None:
    print(
        f"{'t':>6} {'requests':>9} {'req/s':>7} {'errors':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'lag s':>6} {'RSS MB':>7} {'fds':>5} {'tasks':>5} {'serving':>7}",
        flush=True,
    )


def print_row(v: Vitals, w: Window, elapsed: float) -> None:
    p50 = p99 = float("nan")
    if len(w.latencies) >= 2:
        cuts = statistics.quantiles(w.latencies, n=100, method="inclusive")
        p50, p99 = cuts[49] * 1000, cuts[98] * 1000
    rate = w.done / elapsed if elapsed > 0 else 0.0
    print(
        f"{v.t:>6.0f} {w.done:>9} {rate:>7.0f} {w.errors:>6} {p50:>7.1f} {p99:>7.1f} "
        f"{w.lag_s:>6.2f} {v.rss_mb:>7.1f} {v.fds:>5} {v.tasks:>5} {v.serving:>7}",
        flush=True,
    )


def print_summary(soak: Soak, target: float) -> None:
    samples = soak.samples
    # The first sample is taken right after the burst (its connections and pools still
    # draining): it shows where the soak starts, the slopes start one interval in.
    steady = samples[1:]
    if len(steady) < 2:
        print("too few samples for a slope")
        return
    half = [s for s in steady if s.t >= steady[-1].t / 2]

    def slopes(points: Sequence[Vitals]) -> str:
        rss = slope_per_hour([(s.t, s.rss_mb) for s in points])
        fds = slope_per_hour([(s.t, s.fds) for s in points])
        tasks = slope_per_hour([(s.t, s.background) for s in points])
        return (
            f"RSS {rss:+.1f} MB/hour, fds {fds:+.1f}/hour, "
            f"tasks serving no request {tasks:+.1f}/hour"
        )

    first, last = samples[0], samples[-1]
    total = soak.total
    achieved = total.done / soak.elapsed_s if soak.elapsed_s else 0.0
    print()
    print(
        f"sent {total.done} requests in {soak.elapsed_s:.0f} s: {achieved:.0f} req/s "
        f"(target {target:.0f}), {total.errors} errors {total.codes or ''}"
    )
    print(
        f"RSS {first.rss_mb:.1f} -> {last.rss_mb:.1f} MB, fds {first.fds} -> {last.fds}, "
        f"tasks serving no request {first.background} -> {last.background}"
    )
    print(f"slope from t={steady[0].t:.0f} s ({len(steady)} samples): {slopes(steady)}")
    if len(half) >= 2 and len(half) < len(steady):
        print(f"slope over the second half ({len(half)} samples): {slopes(half)}")
    if achieved < 0.95 * target:
        print(f"note: the load fell short of its target ({achieved:.0f} of {target:.0f} req/s)")


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the paced load")
    p.add_argument("--fraction", type=float, default=0.7, help="share of the measured maximum")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    p.add_argument("--burst-seconds", type=int, default=10, help="burst that finds the maximum")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--redis-url", default=None, help="soak the Redis store instead")
    options = p.parse_args(argv)
    if not 0 < options.fraction <= 1:
        p.error("--fraction must be in (0, 1]")
    if options.minutes <= 0 or options.interval <= 0 or options.concurrency < 1:
        p.error("--minutes, --interval and --concurrency must be positive")
    return options


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C


def main(argv: Sequence[str]) -> int:
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp, Fleet(Path(tmp)) as kids:
        try:
            try:
                upstreams = {
                    "v1": model_server(kids, "v1", "--seed", "1"),
                    "v2": model_server(kids, "v2", "--seed", "2"),
                    "v3": model_server(kids, "v3", "--seed", "3", "--score-offset", "0.05"),
                }
                gw = start_gateway(kids, upstreams, options.redis_url)
            except StartError as exc:
                raise SystemExit(f"did not start: {exc}") from exc
            print(f"gateway pid {gw.pid} on {gw.url}; upstreams and logs in {tmp}", flush=True)
            tool = "wrk -t1 -c32" if shutil.which("wrk") else "aiohttp, 32 connections"
            print(
                f"measuring the maximum: {options.burst_seconds} s burst ({tool}) ...", flush=True
            )
            if shutil.which("wrk"):
                maximum, errors = wrk_burst(gw.url, options.burst_seconds, Path(tmp))
            else:
                maximum, errors = asyncio.run(aiohttp_burst(gw.url, options.burst_seconds))
            rate = options.fraction * maximum
            print(
                f"maximum {maximum:.0f} req/s ({errors}); soaking at {rate:.0f} req/s "
                f"({options.fraction:.0%}) for {options.minutes:g} min, at most "
                f"{options.concurrency} in flight, a sample every {options.interval:g} s",
                flush=True,
            )
            soak = Soak(gw, rate, options.minutes * 60, options.concurrency, options.interval)
            try:
                asyncio.run(soak.run())
            except KeyboardInterrupt:
                print("\ninterrupted: the summary covers the samples taken so far")
            print_summary(soak, rate)
        finally:
            if options.redis_url:
                with contextlib.suppress(Exception):
                    forget_redis_keys(options.redis_url)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
