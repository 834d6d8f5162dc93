"""`make bench` (second part): many concurrent LLM streams through one gateway worker.

N streams (`--streams`, 1,000) at once, each `--events` (100) token events `--gap-ms` (100) apart
from `gateway model-server --openai`, first straight to the upstream, then through `gateway
serve` (one worker, one flag on /v1 routing the body's model, the unit from the body). The
client (this process, uvloop + aiohttp) notes when each event arrives and reports:

- TTFT (request to first event) p50 / p99, direct and through the gateway, and what the gateway
  adds;
- the gaps between a stream's events p50 / p99, both ways, and the p99 the gateway adds;
- streams broken (an error, or no `data: [DONE]`), the events received, and the gateway's peak
  RSS (VmHWM of its process).

The streams start spread over `--ramp-s` (1 s) so that the connects do not all land at once.
Markdown on standard output (for bench/RESULTS.md), progress on standard error. Every child is
stopped at the end, as in bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import uvloop
from processes import Fleet, free_port

GATEWAY = str(Path(sys.executable).with_name("gateway"))
BODY = {"model": "llama", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}


@dataclass(slots=True)
class Run:
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    late: list[float] = field(default_factory=list)  # arrival minus the upstream's schedule
    events: int = 0
    broken: int = 0


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def one_stream(
    session: aiohttp.ClientSession, url: str, user: int, run: Run, args: argparse.Namespace
) -> None:
    n, gap_s, ttft_s = args.events, args.gap_ms / 1000.0, args.ttft_ms / 1000.0
    body = {**BODY, "user": f"user-{user}", "max_tokens": n}
    started = time.perf_counter()
    last = None
    buffered = b""
    done = False
    seen = 0
    try:
        async with session.post(url, json=body) as response:
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                buffered += chunk
                count = buffered.count(b"\n\n")
                if not count:
                    continue
                done = done or b"data: [DONE]" in buffered
                buffered = buffered[buffered.rfind(b"\n\n") + 2 :]
                run.events += count
                for e in range(seen, seen + count):
                    # event 0 is the role chunk, 1..n the tokens, then finish, usage, [DONE]
                    ideal = ttft_s + max(0, min(e, n) - 1) * gap_s
                    run.late.append(now - started - ideal)
                seen += count
                if last is None:
                    run.ttft.append(now - started)
                else:
                    run.gaps.append(now - last)
                last = now
    except (aiohttp.ClientError, TimeoutError):
        done = False
    if not done:
        run.broken += 1


async def drive(url: str, args: argparse.Namespace) -> Run:
    run = Run()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        for i in range(args.streams):
            tasks.append(asyncio.create_task(one_stream(session, url, i, run, args)))
            await asyncio.sleep(args.ramp_s / args.streams)
        await asyncio.gather(*tasks)
    return run


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def row(name: str, run: Run, args: argparse.Namespace) -> dict[str, float]:
    ms = 1000.0
    return {
        "late_p50": quantile(run.late, 0.5) * ms,
        "late_p99": quantile(run.late, 0.99) * ms,
        "name": name,  # type: ignore[dict-item]
        "ttft_p50": quantile(run.ttft, 0.5) * ms,
        "ttft_p99": quantile(run.ttft, 0.99) * ms,
        "gap_p50": quantile(run.gaps, 0.5) * ms,
        "gap_p99": quantile(run.gaps, 0.99) * ms,
        "events": run.events,
        "broken": run.broken,
        "streams": args.streams,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--gap-ms", type=float, default=100.0)
    parser.add_argument("--ttft-ms", type=float, default=100.0)
    parser.add_argument("--ramp-s", type=float, default=1.0)
    parser.add_argument(
        "--client",
        default=None,
        choices=["aiohttp-direct", "httptools", "aiohttp", "httpx"],
        help="the gateway's upstream.client (default: the gateway's own default)",
    )
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gateway-streams-") as tmp, Fleet(Path(tmp)) as fleet:
        up = free_port()
        fleet.start(
            "llm",
            [GATEWAY, "model-server", "--openai", "--port", str(up), "--name", "llm",
             "--tokens-per-s", str(1000.0 / args.gap_ms), "--ttft-ms", str(args.ttft_ms)],
            port=up,
        )  # fmt: skip
        upstream = f"http://127.0.0.1:{up}"
        flags = {"flags": [{"key": "chat", "route": {"path_prefix": "/v1", "model": "llama"},
                            "unit": {"from": "body"},
                            "stable": {"name": "v1", "upstream": upstream}}]}  # fmt: skip
        settings = {"listen": {"host": "127.0.0.1"}, "admin": {"host": "127.0.0.1"},
                    "upstream": {"max_connections": args.streams * 2}}  # fmt: skip
        if args.client is not None:
            settings["upstream"]["client"] = args.client
        (Path(tmp) / "flags.json").write_text(json.dumps(flags))
        (Path(tmp) / "gateway.json").write_text(json.dumps(settings))
        port, admin = free_port(), free_port()
        gateway = fleet.start(
            "gateway",
            [GATEWAY, "serve", "--flags", f"{tmp}/flags.json", "--config", f"{tmp}/gateway.json",
             "--port", str(port), "--admin-port", str(admin)],
            port=admin,
        )  # fmt: skip
        path = "/v1/chat/completions"
        print(f"direct: {args.streams} streams ...", file=sys.stderr)
        direct = uvloop.run(drive(f"http://127.0.0.1:{up}{path}", args))
        print(f"gateway: {args.streams} streams ...", file=sys.stderr)
        cpu_before = cpu_s(gateway.process.pid)
        through = uvloop.run(drive(f"http://127.0.0.1:{port}{path}", args))
        args.cpu_us_per_event = (cpu_s(gateway.process.pid) - cpu_before) / through.events * 1e6
        rss = peak_rss_mb(gateway.process.pid)
    rows = [row("direct", direct, args), row("gateway", through, args)]
    print(render(rows, rss, args))
    return 0


def render(rows: list[dict[str, float]], rss: float, args: argparse.Namespace) -> str:
    d, g = rows
    lines = [
        f"{args.streams} concurrent streams x {args.events} events, {args.gap_ms:g} ms apart "
        f"(TTFT {args.ttft_ms:g} ms at the upstream), one gateway worker"
        + (f", upstream.client: {args.client}" if args.client else "")
        + "; "
        f"load average before: {args.load_before:.2f}, {os.cpu_count()} cores",
        "",
        "| path | TTFT p50 ms | TTFT p99 ms | gap p50 ms | gap p99 ms | event late p50 ms "
        "| event late p99 ms | events | broken |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['ttft_p50']:.1f} | {r['ttft_p99']:.1f} | {r['gap_p50']:.2f} "
            f"| {r['gap_p99']:.2f} | {r['late_p50']:.1f} | {r['late_p99']:.1f} | {r['events']} "
            f"| {r['broken']} of {r['streams']} |"
        )
    lines += [
        "",
        f"- TTFT added by the gateway: p50 {g['ttft_p50'] - d['ttft_p50']:+.2f} ms, "
        f"p99 {g['ttft_p99'] - d['ttft_p99']:+.2f} ms",
        f"- inter-event gap p99 added: {g['gap_p99'] - d['gap_p99']:+.2f} ms; event lateness "
        f"(arrival minus the upstream's schedule) added: p50 {g['late_p50'] - d['late_p50']:+.1f}"
        f" ms, p99 {g['late_p99'] - d['late_p99']:+.1f} ms",
        f"- gateway peak RSS: {rss:.0f} MB; gateway CPU per event: {args.cpu_us_per_event:.0f} us",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
