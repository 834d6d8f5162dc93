"""What a bench run found, printed as Markdown (for bench/RESULTS.md) and saved as JSON.

Each row is measured once per pass; the table gives the median of the passes per figure
(req/s, p50 and p99 independently), the ratios are of median req/s, and the per-pass req/s
and the load average before each pass are printed too, so a reader can judge the noise.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import cpu
import lightload
import pyspy
import wrk
from options import Options
from rows import NGINX, REDIS, ROWS, USERS_SCRIPT, Row

# Every row is compared with these, in this order.
BASELINES = ("naive", "bare", "nginx")
PACKAGES = ("uvicorn", "uvloop", "httptools", "aiohttp", "httpx", "starlette", "prometheus-client")
# The targets: (what, row, baseline row, least ratio of median req/s).
RATIO_TARGETS = (
    ("all features, 1 worker: >= 1.0x the bare proxy", "gateway-all", "bare", 1.0),
    ("all features, 1 worker: >= 10x the naive proxy", "gateway-all", "naive", 10.0),
    ("all features, 1 worker: >= 15 % of nginx-as-proxy", "gateway-all", "nginx", 0.15),
    ("all features, 2 workers: >= 1.7x one worker", "gateway-all-2w", "gateway-all", 1.7),
    ("fast path (fast server, default client): >= 1.7x the bare proxy", "gateway-all", "bare", 1.7),
    (
        "stock fallback (stock server, httptools client): >= 1.0x the bare proxy",
        "gateway-all-stock",
        "bare",
        1.0,
    ),
)
# (what, row, most added p50 over direct at light load, ms)
LATENCY_TARGETS = (("all features: added p50 over direct <= 0.5 ms", "gateway-all", 0.5),)


@dataclass(slots=True)
class Result:
    name: str
    what: str
    status: str  # ok | skipped | failed
    reason: str = ""
    load: wrk.Load | None = None
    other_cpu: float | None = None  # share of all CPU time used by other work during wrk
    cpu_us_per_request: float | None = None  # the row's own processes, during wrk
    light: lightload.Latency | None = None


@dataclass(frozen=True, slots=True)
class Pass:
    index: int
    loadavg: tuple[float, float, float]  # 1, 5, 15 min, just before the pass
    busy_before: float  # share of both cores in use over the second before the pass
    results: list[Result]


@dataclass(frozen=True, slots=True)
class Median:
    """One row over every pass: medians of what was measured, and every pass's req/s."""

    name: str
    what: str
    status: str  # ok when at least one pass measured it
    reasons: tuple[str, ...]
    rps: float | None
    p50_ms: float | None
    p99_ms: float | None
    errors: int  # summed over the passes
    other_cpu: float | None
    cpu_us_per_request: float | None
    per_pass: tuple[float | None, ...]  # req/s
    other_per_pass: tuple[float | None, ...]
    light_p50_ms: float | None
    light_p99_ms: float | None
    light_requests: int
    light_errors: int


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "nginx": _tool_version([str(NGINX), "-v"], r"nginx/\S+"),
        "redis": _tool_version([str(REDIS), "--version"], r"v=\S+"),
        "wrk": _tool_version(["wrk", "--version"], r"wrk \S+"),
        "py-spy": _version("py-spy"),
        # Taken before the bench loads the machine: other work there squeezes every row.
        "loadavg_before": os.getloadavg(),
        "cpu_busy_before": cpu.busy_share(),
    }


def medians(passes: list[Pass]) -> list[Median]:
    names = list(dict.fromkeys(r.name for p in passes for r in p.results))
    return [_median([r for p in passes for r in p.results if r.name == n]) for n in names]


def _median(results: list[Result]) -> Median:
    loads = [r.load for r in results if r.load is not None]
    lights = [r.light for r in results if r.light is not None]
    others = [r.other_cpu for r in results if r.other_cpu is not None]
    return Median(
        name=results[0].name,
        what=results[0].what,
        status="ok" if loads else results[0].status,
        reasons=tuple(dict.fromkeys(r.reason for r in results if r.reason)),
        rps=_mid(load.requests_per_s for load in loads),
        p50_ms=_mid(load.p50_ms for load in loads),
        p99_ms=_mid(load.p99_ms for load in loads),
        errors=sum(load.errors for load in loads),
        other_cpu=_mid(others),
        cpu_us_per_request=_mid(
            r.cpu_us_per_request for r in results if r.cpu_us_per_request is not None
        ),
        per_pass=tuple(r.load.requests_per_s if r.load else None for r in results),
        other_per_pass=tuple(r.other_cpu for r in results),
        light_p50_ms=_mid(light.p50_ms for light in lights),
        light_p99_ms=_mid(light.p99_ms for light in lights),
        light_requests=sum(light.requests for light in lights),
        light_errors=sum(light.errors for light in lights),
    )


def render(
    argv: list[str],
    options: Options,
    upstream: Row,
    passes: list[Pass],
    info: dict[str, Any],
    profiled: pyspy.Profile | str | None = None,
) -> str:
    rows = medians(passes)
    lines = _header(argv, options, upstream, passes, info)
    lines += [
        "",
        f"Median of {len(passes)} pass(es) per figure; ratios are of median req/s.",
        "",
        "| row | req/s | p50 ms | p99 ms | errors | x naive | x bare | x nginx | CPU us/req "
        "| other CPU | what |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [_load_line(row, rows, options) for row in rows]
    lines += _notes(rows)
    lines += _per_pass(rows, passes)
    lines += _light(options, rows)
    lines += _targets(rows, passes)
    lines += [
        "",
        "CPU us/req: CPU time of the row's own processes (the proxy and its workers, not the "
        "upstream or wrk) per request served, while wrk ran; less sensitive to neighbours "
        "than req/s. other CPU: share of both cores used by processes outside the bench while "
        "wrk ran (median over the passes); rows are comparable only when it is near 0 %.",
    ]
    if isinstance(profiled, str):
        lines += ["", profiled]
    elif profiled is not None:
        lines += ["", *pyspy.render(profiled)]
    return "\n".join(lines)


def as_json(
    argv: list[str],
    options: Options,
    upstream: Row,
    passes: list[Pass],
    info: dict[str, Any],
    profiled: pyspy.Profile | str | None = None,
) -> dict[str, Any]:
    rows = medians(passes)
    return {
        "command": _command(argv),
        "machine": info,
        "wrk": {
            "threads": 1,
            "connections": options.connections,
            "seconds": options.seconds,
            "turns": options.turns,
        },
        "upstream": upstream.name,
        "passes": [asdict(p) for p in passes],
        "medians": [asdict(row) for row in rows],
        "ratios": {row.name: _ratio_values(row, rows) for row in rows},
        "targets": [asdict(t) for t in _target_values(rows, passes)],
        "profile": asdict(profiled) if isinstance(profiled, pyspy.Profile) else profiled,
    }


def _header(
    argv: list[str], options: Options, upstream: Row, passes: list[Pass], info: dict[str, Any]
) -> list[str]:
    burst = options.seconds / options.turns
    load = wrk.command("URL", threads=1, connections=options.connections, seconds=burst)
    busy = info["cpu_busy_before"]
    before = "; ".join(
        f"pass {p.index}: {_loadavg(p.loadavg)} ({p.busy_before:.0%} busy)" for p in passes
    )
    return [
        f"command: `{_command(argv)}`",
        f"date: {info['date']}",
        f"machine: nproc {info['nproc']}, {info['cpu']}, Linux {info['kernel']}, "
        f"Python {info['python']}; load average {_loadavg(info['loadavg_before'])} and CPU "
        f"{busy:.0%} busy just before the run"
        + (" (other work shared the cores)" if busy > 0.1 else ""),
        "versions: "
        + ", ".join(f"{k} {v}" for k, v in info["packages"].items())
        + f", {info['nginx']}, redis {info['redis']}, {info['wrk']}, py-spy {info['py-spy']}",
        f"load: `{' '.join(load)}` after {options.warmup:g} s of warm-up"
        + (
            f", {options.turns} times a row per pass, the rows served at once and taking "
            "turns (order reversed each round)"
            if options.turns > 1
            else ", once a row per pass, one row after another"
        )
        + "; rows marked "
        f"* add `-s bench/{USERS_SCRIPT.name}` (x-user-id from 1,000 users); nothing pinned",
        f"upstream: {upstream.name} ({upstream.what}); canary and shadow upstreams, where a "
        "row has them, are more of the same on their own ports",
        f"load average (1, 5, 15 min) and CPU busy before each pass: {before}",
    ]


def _load_line(row: Median, rows: list[Median], options: Options) -> str:
    marked = row.name + (" *" if _row(row.name).users else "")
    if row.rps is None:
        return f"| {marked} | {row.status} (see below) | | | | | | | | | {row.what} |"
    ratios = _ratio_values(row, rows)
    cells = [f"{ratios[b]:.2f}" if b in ratios and b != row.name else "" for b in BASELINES]
    other = f"{row.other_cpu:.0%}" if row.other_cpu is not None else ""
    own = f"{row.cpu_us_per_request:,.0f}" if row.cpu_us_per_request is not None else ""
    return (
        f"| {marked} | {row.rps:,.0f} | {row.p50_ms:.2f} | {row.p99_ms:.2f} | {row.errors} "
        f"| {' | '.join(cells)} | {own} | {other} | {row.what} |"
    )


def _notes(rows: list[Median]) -> list[str]:
    lines: list[str] = []
    for row in rows:
        for reason in row.reasons:
            first, *rest = reason.splitlines() or [""]
            lines += ["", f"- {row.name} {row.status}: {first}", *rest]
    return lines


def _per_pass(rows: list[Median], passes: list[Pass]) -> list[str]:
    if len(passes) < 2:
        return []
    numbers = " | ".join(f"pass {p.index}" for p in passes)
    lines = [
        "",
        "req/s per pass (other CPU in brackets):",
        "",
        f"| row | {numbers} | max/min |",
        "|---|" + "---:|" * (len(passes) + 1),
    ]
    for row in rows:
        cells = [
            f"{rps:,.0f} ({other:.0%})" if rps is not None and other is not None else "-"
            for rps, other in zip(row.per_pass, row.other_per_pass, strict=True)
        ]
        measured = [rps for rps in row.per_pass if rps]
        spread = f"{max(measured) / min(measured):.2f}" if measured else ""
        lines.append(f"| {row.name} | {' | '.join(cells)} | {spread} |")
    return lines


def _ratio_values(row: Median, rows: list[Median]) -> dict[str, float]:
    by_name = {r.name: r.rps for r in rows if r.rps}
    if row.rps is None:
        return {}
    return {name: row.rps / by_name[name] for name in BASELINES if name in by_name}


def _light(options: Options, rows: list[Median]) -> list[str]:
    measured = [r for r in rows if r.light_p50_ms is not None]
    if not measured:
        return []
    lines = [
        "",
        f"added latency at light load: {options.light_rate:g} req/s for "
        f"{options.light_seconds:g} s on one keep-alive connection (http.client, paced); "
        "medians of the passes",
        "",
        "| row | p50 ms | p99 ms | requests | errors | p50 over direct ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in measured:
        added = _added_p50(row.name, rows)
        lines.append(
            f"| {row.name} | {row.light_p50_ms:.3f} | {row.light_p99_ms:.3f} "
            f"| {row.light_requests} | {row.light_errors} "
            f"| {f'{added:+.3f}' if added is not None and row.name != 'direct' else ''} |"
        )
    return lines


def _added_p50(name: str, rows: list[Median]) -> float | None:
    by_name = {r.name: r.light_p50_ms for r in rows}
    row, direct = by_name.get(name), by_name.get("direct")
    return row - direct if row is not None and direct is not None else None


@dataclass(frozen=True, slots=True)
class TargetCheck:
    what: str
    figure: str
    met: bool | None  # None: not measured in this run


def _target_values(rows: list[Median], passes: list[Pass]) -> list[TargetCheck]:
    by_name = {r.name: r.rps for r in rows if r.rps}
    checks = []
    for what, name, baseline, least in RATIO_TARGETS:
        if name in by_name and baseline in by_name:
            ratio = by_name[name] / by_name[baseline]
            figure = f"{ratio:.2f}x ({by_name[name]:,.0f} / {by_name[baseline]:,.0f} req/s)"
            within = _pass_ratios(passes, name, baseline)
            if len(within) > 1:
                # Judged within the passes: two rows of one pass saw the same minutes (in
                # turns, the same ones), while two medians may come from different passes.
                ratio = statistics.median(within)
                figure = (
                    f"{ratio:.2f}x, the median of the ratios within each pass ("
                    + ", ".join(f"{r:.2f}" for r in within)
                    + f"); of the medians: {figure}"
                )
            checks.append(TargetCheck(what, figure, ratio >= least))
        else:
            checks.append(TargetCheck(what, f"not measured ({name}, {baseline})", None))
    for what, name, most in LATENCY_TARGETS:
        added = _added_p50(name, rows)
        if added is None:
            checks.append(TargetCheck(what, f"not measured ({name}, direct)", None))
        else:
            checks.append(TargetCheck(what, f"{added:+.3f} ms", added <= most))
    return checks


def _pass_ratios(passes: list[Pass], name: str, baseline: str) -> list[float]:
    """The ratio of two rows' req/s within each pass that measured both."""
    ratios = []
    for p in passes:
        rps = {r.name: r.load.requests_per_s for r in p.results if r.load is not None}
        if rps.get(name) and rps.get(baseline):
            ratios.append(rps[name] / rps[baseline])
    return ratios


def _targets(rows: list[Median], passes: list[Pass]) -> list[str]:
    lines = [
        "",
        "targets (on the ratios within each pass where there are several passes, else on the "
        "medians above):",
        "",
        "| target | figure | met |",
        "|---|---|---|",
    ]
    for check in _target_values(rows, passes):
        met = {True: "yes", False: "**no**", None: "n/a"}[check.met]
        lines.append(f"| {check.what} | {check.figure} | {met} |")
    return lines


def _row(name: str) -> Row:
    return next((row for row in ROWS if row.name == name), Row(name, "", None))


def _command(argv: list[str]) -> str:
    return shlex.join([sys.executable, "bench/run.py", *argv])


def _loadavg(loadavg: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.2f}" for value in loadavg)


def _mid(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


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
