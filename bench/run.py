"""`make bench`: throughput and added latency of the gateway against the usual alternatives.

Every row runs against the same upstream, for the same duration, with one wrk thread (2 cores
here: wrk, the proxy and the upstream already share them) after a short warm-up. Every process
but wrk is a child of this script and is stopped at the end, on Ctrl-C and on errors too.
The report is Markdown on standard output, to paste into bench/RESULTS.md; progress goes to
standard error. See bench/README.md.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import cpu
import lightload
import report
import wrk
from options import Options, parse_args
from processes import Fleet, StartError, free_port
from report import Result
from rows import UPSTREAMS, Row, Spot


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
        port = free_port()
        assert upstream.launch is not None
        try:
            fleet.start("upstream", upstream.launch(Spot(port, "", fleet.workdir)), port=port)
        except StartError as exc:
            print(f"upstream {upstream.name} did not start: {exc}", file=sys.stderr)
            return 1
        results = [measure(row, fleet, port, options) for row in options.rows]
    print(report.render(argv, options, upstream, results, info))
    if options.json_path:
        document = report.as_json(argv, options, upstream, results, info)
        options.json_path.write_text(json.dumps(document, indent=2) + "\n")
    return 0


def measure(row: Row, fleet: Fleet, upstream_port: int, options: Options) -> Result:
    """One row: start its process (if any), warm up, run wrk, maybe the light load, stop it."""
    result = Result(row.name, row.what, "ok")
    if reason := row.needs():
        return _give_up(result, "skipped", reason)
    port, child = upstream_port, None
    if row.launch is not None:
        port = free_port()
        spot = Spot(port, f"http://127.0.0.1:{upstream_port}", fleet.workdir)
        try:
            child = fleet.start(row.name, row.launch(spot), port=port)
        except (StartError, OSError) as exc:
            return _give_up(result, "failed", f"did not start: {exc}")
    try:
        _load(result, port, options)
    except (wrk.WrkError, OSError) as exc:
        return _give_up(result, "failed", str(exc))
    finally:
        if child is not None:
            fleet.stop(child)
    return result


def _load(result: Result, port: int, options: Options) -> None:
    url = f"http://127.0.0.1:{port}/"
    _progress(f"{result.name}: warm-up {options.warmup:g} s, then {options.seconds:g} s of wrk")
    if options.warmup > 0:
        wrk.run(url, threads=1, connections=options.connections, seconds=options.warmup)
    before = cpu.ticks()
    result.load = wrk.run(url, threads=1, connections=options.connections, seconds=options.seconds)
    result.other_cpu = cpu.foreign_share(before, cpu.ticks())
    if result.name in options.light_rows:
        _progress(f"{result.name}: {options.light_rate:g} req/s for {options.light_seconds:g} s")
        result.light = lightload.measure(
            port, rate=options.light_rate, seconds=options.light_seconds
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
