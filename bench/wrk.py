"""Run wrk and read its report: throughput, latency percentiles, errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_REQUESTS = re.compile(r"(\d+) requests in")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


class WrkError(Exception):
    """wrk failed or printed something we cannot read."""


@dataclass(frozen=True, slots=True)
class Load:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx/3xx responses plus socket errors


def find_wrk() -> str | None:
    return shutil.which("wrk")


def command(
    url: str, *, threads: int, connections: int, seconds: float, script: Path | None = None
) -> list[str]:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    if script is not None:
        argv += ["-s", str(script)]
    return [*argv, "--latency", url]


def run(
    url: str, *, threads: int, connections: int, seconds: float, script: Path | None = None
) -> Load:
    argv = command(url, threads=threads, connections=connections, seconds=seconds, script=script)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise WrkError(f"wrk exited with {done.returncode}: {done.stderr.strip()}")
    return parse(done.stdout)


@dataclass(frozen=True, slots=True)
class Running:
    process: subprocess.Popen[str]
    seconds: float


def start(
    url: str, *, threads: int, connections: int, seconds: float, script: Path | None = None
) -> Running:
    """wrk in the background (to profile the server meanwhile); `finish` reads its report."""
    argv = command(url, threads=threads, connections=connections, seconds=seconds, script=script)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Running(process, seconds)


def stop(running: Running) -> None:
    running.process.kill()
    running.process.communicate()


def finish(running: Running) -> Load:
    try:
        out, err = running.process.communicate(timeout=running.seconds + 60)
    except subprocess.TimeoutExpired:
        stop(running)
        raise WrkError("wrk did not finish in time") from None
    if running.process.returncode != 0:
        raise WrkError(f"wrk exited with {running.process.returncode}: {err.strip()}")
    return parse(out)


def parse(report: str) -> Load:
    rps = _RPS.search(report)
    requests = _REQUESTS.search(report)
    percentiles = {int(p): float(v) * _TO_MS[unit] for p, v, unit in _PERCENTILE.findall(report)}
    if not rps or not requests or 50 not in percentiles or 99 not in percentiles:
        raise WrkError(f"cannot read wrk's report:\n{report}")
    non_2xx = _NON_2XX.search(report)
    socket_errors = _SOCKET.search(report)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return Load(
        float(rps.group(1)), percentiles[50], percentiles[99], int(requests.group(1)), errors
    )
