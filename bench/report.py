"""What a bench run found, printed as Markdown (for bench/RESULTS.md) and saved as JSON."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import cpu
import lightload
import wrk
from options import Options
from rows import NGINX, Row

# The gateway row is compared with these, in this order.
BASELINES = ("naive", "bare", "nginx")


@dataclass(slots=True)
class Result:
    name: str
    what: str
    status: str  # ok | skipped | failed
    reason: str = ""
    load: wrk.Load | None = None
    other_cpu: float | None = None  # share of all CPU time used by other work during wrk
    light: lightload.Latency | None = None


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in ("uvicorn", "aiohttp", "httpx", "starlette")},
        "nginx": _tool_version([str(NGINX), "-v"], r"nginx/\S+"),
        "wrk": _tool_version(["wrk", "--version"], r"wrk \S+"),
        # Taken before the bench loads the machine: other work there squeezes every row.
        "cpu_busy_before": cpu.busy_share(),
    }


def render(
    argv: list[str], options: Options, upstream: Row, results: list[Result], info: dict[str, Any]
) -> str:
    load = wrk.command("URL", threads=1, connections=options.connections, seconds=options.seconds)
    lines = [
        f"command: `{_command(argv)}`",
        f"date: {info['date']}",
        f"machine: nproc {info['nproc']}, {info['cpu']}, Linux {info['kernel']}, "
        f"Python {info['python']}; CPU {info['cpu_busy_before']:.0%} busy just before the run"
        + (" (other work shared the cores)" if info["cpu_busy_before"] > 0.1 else ""),
        "versions: "
        + ", ".join(f"{k} {v}" for k, v in info["packages"].items())
        + f", {info['nginx']}, {info['wrk']}",
        f"load: `{' '.join(load)}` per row after {options.warmup:g} s of warm-up; nothing pinned",
        f"upstream: {upstream.name} ({upstream.what})",
        "",
        "| row | req/s | p50 ms | p99 ms | errors | other CPU | what |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [_load_line(result) for result in results]
    lines += _notes(results)
    lines += _ratios(results)
    lines += _light(options, results)
    lines += [
        "",
        "other CPU: share of both cores used by processes outside the bench while wrk ran; "
        "rows are comparable only when it is near 0 %.",
    ]
    return "\n".join(lines)


def as_json(
    argv: list[str], options: Options, upstream: Row, results: list[Result], info: dict[str, Any]
) -> dict[str, Any]:
    return {
        "command": _command(argv),
        "machine": info,
        "wrk": {"threads": 1, "connections": options.connections, "seconds": options.seconds},
        "upstream": upstream.name,
        "rows": [asdict(result) for result in results],
        "ratios": _ratio_values(results),
    }


def _load_line(result: Result) -> str:
    if result.load is None:
        return f"| {result.name} | {result.status} (see below) | | | | | {result.what} |"
    load, other = result.load, f"{result.other_cpu:.0%}" if result.other_cpu is not None else ""
    return (
        f"| {result.name} | {load.requests_per_s:,.0f} | {load.p50_ms:.2f} | {load.p99_ms:.2f} "
        f"| {load.errors} | {other} | {result.what} |"
    )


def _notes(results: list[Result]) -> list[str]:
    lines: list[str] = []
    for result in results:
        if result.reason:
            first, *rest = result.reason.splitlines() or [""]
            lines += ["", f"- {result.name} {result.status}: {first}", *rest]
    return lines


def _ratio_values(results: list[Result]) -> dict[str, float]:
    by_name = {r.name: r.load for r in results if r.load is not None}
    gateway = by_name.get("gateway")
    if gateway is None:
        return {}
    return {
        f"gateway/{name}": gateway.requests_per_s / by_name[name].requests_per_s
        for name in BASELINES
        if name in by_name and by_name[name].requests_per_s > 0
    }


def _ratios(results: list[Result]) -> list[str]:
    ratios = _ratio_values(results)
    if not ratios:
        return ["", "ratios: no gateway row measured"]
    return ["", "req/s ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())]


def _light(options: Options, results: list[Result]) -> list[str]:
    measured = [r for r in results if r.light is not None]
    if not measured:
        return []
    lines = [
        "",
        f"added latency at light load: {options.light_rate:g} req/s for "
        f"{options.light_seconds:g} s on one keep-alive connection (http.client, paced)",
        "",
        "| row | p50 ms | p99 ms | requests | errors | p50 over direct ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    direct = next((r.light for r in measured if r.name == "direct"), None)
    for result in measured:
        light = result.light
        assert light is not None
        added = f"{light.p50_ms - direct.p50_ms:+.3f}" if direct and result.name != "direct" else ""
        lines.append(
            f"| {result.name} | {light.p50_ms:.3f} | {light.p99_ms:.3f} | {light.requests} "
            f"| {light.errors} | {added} |"
        )
    return lines


def _command(argv: list[str]) -> str:
    return shlex.join([sys.executable, "bench/run.py", *argv])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def _tool_version(argv: list[str], pattern: str) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(0) if found else None
