"""`make bench`: throughput and added latency of the gateway against the usual alternatives.

Every row runs against the same upstream, for the same duration, with one wrk thread (2 cores
here: wrk, the proxy and the upstream already share them) after a short warm-up. The rows are
measured in `--passes` passes (all rows, then all rows again, ...) and the report gives each
row's median, with the load average before every pass. Within a pass the rows are served at
once and take turns, `--turns` wrk bursts each (bench/turns.py), so that the rows of a ratio
share the same minutes of a machine whose speed drifts; `--turns 1` measures one row after
another instead. Every process but wrk is a child of
this script and is stopped at the end, on Ctrl-C and on errors too. The report is Markdown on
standard output, to paste into bench/RESULTS.md; progress goes to standard error.
See bench/README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import cpu
import lightload
import pyspy
import report
import turns
import wrk
from options import Options, parse_args
from processes import Child, Fleet, StartError, free_port, pings, wait_listening, wait_settled
from report import Pass, Result
from rows import UPSTREAMS, USERS, USERS_SCRIPT, Row, Spot, redis_server

Upstreams = dict[str, int]  # role (stable, canary, shadow) -> port
Profiled = pyspy.Profile | str  # the summary, or why there is none
_PROFILE_MARGIN_S = 1.0  # wrk runs this much longer than py-spy on either side


def main(argv: list[str]) -> int:
    options = parse_args(argv)
    if wrk.find_wrk() is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 1
    info = report.machine()  # before we load the machine
    upstream = choose_upstream(options.upstream)
    if upstream is None:
        return 1
    signal.signal(signal.SIGTERM, _interrupt)  # so teardown runs on SIGTERM as on Ctrl-C
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp, Fleet(Path(tmp)) as fleet:
        try:
            profiled_row = () if options.profile is None else (options.profile,)
            upstreams = start_upstreams(upstream, fleet, options.rows + profiled_row)
        except StartError as exc:
            print(f"upstream {upstream.name} did not start: {exc}", file=sys.stderr)
            return 1
        passes = [run_pass(i, fleet, upstreams, options) for i in range(1, options.passes + 1)]
        profiled = None
        if options.profile is not None:
            profiled = profile_row(options.profile, fleet, upstreams, options)
    print(report.render(argv, options, upstream, passes, info, profiled))
    if options.json_path:
        document = report.as_json(argv, options, upstream, passes, info, profiled)
        options.json_path.write_text(json.dumps(document, indent=2) + "\n")
    return 0


def start_upstreams(upstream: Row, fleet: Fleet, rows: Iterable[Row]) -> Upstreams:
    """The stable upstream, plus a canary and a shadow one when one of `rows` forwards to
    them: separate processes on separate ports, so each arm has its own connection pool."""
    assert upstream.launch is not None
    roles = ["stable", *sorted({role for row in rows for role in row.upstreams})]
    ports: Upstreams = {}
    for role in roles:
        port = ports[role] = free_port()
        fleet.start(f"upstream-{role}", upstream.launch(Spot(port, "", fleet.workdir)), port=port)
    return ports


def run_pass(index: int, fleet: Fleet, upstreams: Upstreams, options: Options) -> Pass:
    loadavg = os.getloadavg()
    _progress(f"pass {index} of {options.passes}; load average {_loadavg(loadavg)}")
    busy = cpu.busy_share()
    if options.turns > 1:
        results = turns.measure(
            options.rows,
            lambda row: running(row, fleet, upstreams),
            turns=options.turns,
            seconds=options.seconds,
            warmup=options.warmup,
            connections=options.connections,
            progress=_progress,
        )
    else:
        results = [measure(row, fleet, upstreams, options) for row in options.rows]
    light = [
        (row, result)
        for row, result in zip(options.rows, results, strict=True)
        if row.name in options.light_rows and result.status == "ok"
    ]
    if light:
        measure_light(light, fleet, upstreams, options)
    return Pass(index, loadavg, busy, results)


def measure(row: Row, fleet: Fleet, upstreams: Upstreams, options: Options) -> Result:
    """One row: start its processes (if any), warm up, run wrk, stop."""
    result = Result(row.name, row.what, "ok")
    if reason := row.needs():
        return _give_up(result, "skipped", reason)
    try:
        with running(row, fleet, upstreams) as (port, pid):
            _load(result, row, port, pid, options)
    except StartError as exc:
        return _give_up(result, "failed", f"did not start: {exc}")
    except (wrk.WrkError, OSError) as exc:
        return _give_up(result, "failed", str(exc))
    return result


@contextlib.contextmanager
def running(row: Row, fleet: Fleet, upstreams: Upstreams) -> Iterator[tuple[int, int | None]]:
    """Start the row (and its private Redis) and yield (port, pid); stop both afterwards.

    The pid is the row's own process (None for direct), which py-spy attaches to."""
    children: list[Child] = []
    try:
        try:
            port, pid = _start(row, fleet, upstreams, children)
        except OSError as exc:  # Popen itself failed
            raise StartError(str(exc)) from exc
        yield port, pid
    finally:
        for child in reversed(children):
            fleet.stop(child)


def _start(
    row: Row, fleet: Fleet, upstreams: Upstreams, children: list[Child]
) -> tuple[int, int | None]:
    redis = ""
    if row.redis:
        redis_port = free_port()
        spot = Spot(redis_port, "", fleet.workdir / f"redis-{redis_port}")
        spot.workdir.mkdir(parents=True, exist_ok=True)
        name = f"{row.name}-redis"
        children.append(fleet.start(name, redis_server(spot), port=redis_port, ready=pings))
        redis = f"redis://127.0.0.1:{redis_port}/0"
    if row.launch is None:
        return upstreams["stable"], None
    urls = {role: f"http://127.0.0.1:{port}" for role, port in upstreams.items()}
    port = free_port()
    spot = Spot(
        port,
        urls["stable"],
        fleet.workdir,
        canary=urls.get("canary", ""),
        shadow=urls.get("shadow", ""),
        redis=redis,
    )
    child = fleet.start(row.name, row.launch(spot), port=port)
    children.append(child)
    if row.workers > 1:
        wait_listening(child, row.workers)
    waited = wait_settled(child)
    _progress(f"{row.name}: start-up work done {waited:.1f} s after it answered")
    return port, child.process.pid


def _load(result: Result, row: Row, port: int, pid: int | None, options: Options) -> None:
    url = f"http://127.0.0.1:{port}/"
    script = USERS_SCRIPT if row.users else None
    shape = {"threads": 1, "connections": options.connections, "script": script}
    _progress(f"{result.name}: warm-up {options.warmup:g} s, then {options.seconds:g} s of wrk")
    if options.warmup > 0:
        wrk.run(url, seconds=options.warmup, **shape)
    before, used = cpu.ticks(), cpu.tree_seconds(pid) if pid else 0.0
    result.load = wrk.run(url, seconds=options.seconds, **shape)
    result.other_cpu = cpu.foreign_share(before, cpu.ticks())
    if pid and result.load.requests:
        used = cpu.tree_seconds(pid) - used
        result.cpu_us_per_request = round(used / result.load.requests * 1e6, 1)


def measure_light(
    light: list[tuple[Row, Result]], fleet: Fleet, upstreams: Upstreams, options: Options
) -> None:
    """The light load on all these rows at once, taking turns (`lightload.interleaved`): their
    added latencies are differences taken over the same stretch of time."""
    names = ", ".join(row.name for row, _ in light)
    rate, seconds = options.light_rate, options.light_seconds
    _progress(f"light load: {names}, {rate:g} req/s for {seconds:g} s each, taking turns")
    try:
        with contextlib.ExitStack() as stack:
            ports = [stack.enter_context(running(row, fleet, upstreams))[0] for row, _ in light]
            targets = [
                (port, USERS if row.users else 0)
                for port, (row, _) in zip(ports, light, strict=True)
            ]
            latencies = lightload.interleaved(targets, rate=rate, seconds=seconds)
    except (StartError, OSError) as exc:
        _progress(f"light load: failed: {exc}")
        return
    for (_, result), latency in zip(light, latencies, strict=True):
        result.light = latency


def profile_row(row: Row, fleet: Fleet, upstreams: Upstreams, options: Options) -> Profiled:
    """An extra run of `row` under wrk with py-spy attached, kept out of the table: py-spy's
    sampling takes CPU from the same 2 cores. wrk starts first and ends after py-spy."""
    if reason := row.needs() or pyspy.missing():
        return f"not profiled: {reason}"
    raw = options.profile_out or fleet.workdir / f"{row.name}.raw"
    script = USERS_SCRIPT if row.users else None
    shape = {"threads": 1, "connections": options.connections, "script": script}
    _progress(f"{row.name}: profiling {options.seconds:g} s under wrk (py-spy)")
    try:
        with running(row, fleet, upstreams) as (port, pid):
            if pid is None:
                return f"not profiled: {row.name} has no process of its own"
            url = f"http://127.0.0.1:{port}/"
            if options.warmup > 0:
                wrk.run(url, seconds=options.warmup, **shape)
            load = wrk.start(url, seconds=options.seconds + 2 * _PROFILE_MARGIN_S, **shape)
            try:
                time.sleep(_PROFILE_MARGIN_S)
                pyspy.record(
                    pid,
                    raw,
                    seconds=options.seconds,
                    rate=options.profile_rate,
                    subprocesses=row.workers > 1,
                    blocking=options.profile_blocking,
                )
            except BaseException:
                wrk.stop(load)
                raise
            under = wrk.finish(load)
    except (StartError, wrk.WrkError, pyspy.ProfileError, OSError) as exc:
        return f"not profiled: {exc}"
    return pyspy.summarise(
        raw,
        row=row.name,
        load=under,
        rate=options.profile_rate,
        seconds=options.seconds,
        blocking=options.profile_blocking,
    )


def choose_upstream(preference: str) -> Row | None:
    for candidate in UPSTREAMS:
        if preference not in ("auto", candidate.name):
            continue
        reason = candidate.needs()
        if reason is None:
            _progress(f"upstream: {candidate.name}")
            return candidate
        _progress(f"upstream {candidate.name} unavailable: {reason}")
    print(f"no usable upstream for --upstream {preference}", file=sys.stderr)
    return None


def _give_up(result: Result, status: str, reason: str) -> Result:
    result.status, result.reason = status, reason
    _progress(f"{result.name}: {status}: {reason}")
    return result


def _loadavg(loadavg: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.2f}" for value in loadavg)


def _progress(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted; every child process was stopped", file=sys.stderr)
        sys.exit(130)
