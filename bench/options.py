"""The bench's command line: which rows, how long, how hard, how many passes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from rows import ROWS, UPSTREAMS, Row


@dataclass(frozen=True, slots=True)
class Options:
    rows: tuple[Row, ...]
    upstream: str  # auto, or the name of one of rows.UPSTREAMS
    seconds: float
    warmup: float
    connections: int
    passes: int  # every row is measured once per pass; the report gives the median
    turns: int  # 1: rows one after another; more: all served at once, wrk bursts in turns
    light_rows: frozenset[str]
    light_rate: float
    light_seconds: float
    json_path: Path | None
    profile: Row | None  # profiled with py-spy in an extra run after the passes
    profile_rate: int
    profile_out: Path | None  # where py-spy's raw stacks are kept (else the temp dir)
    profile_blocking: bool  # py-spy pauses the process per sample: whole stacks, more overhead


def parse_args(argv: list[str]) -> Options:
    names = [row.name for row in ROWS]
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Throughput and added latency of the gateway against the usual alternatives.",
    )
    parser.add_argument("--rows", default=",".join(names), help=f"comma-separated, of {names}")
    parser.add_argument(
        "--upstream", default="auto", choices=["auto", *(u.name for u in UPSTREAMS)]
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per row")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c")
    parser.add_argument(
        "--passes", type=int, default=3, help="measure every row this often; report the median"
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=5,
        help="serve a pass's rows at once and give each this many wrk bursts of "
        "duration/turns s, in turns (1: one row after another, a whole duration each)",
    )
    parser.add_argument(
        "--light-rows",
        default="direct,forwarder,bare,nginx,gateway,gateway-all",
        help="comma-separated",
    )
    parser.add_argument("--light-rate", type=float, default=100.0, help="req/s at light load")
    parser.add_argument("--light-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, dest="json_path", help="also save results here")
    parser.add_argument(
        "--profile", metavar="ROW", help="after the passes, profile this row under wrk (py-spy)"
    )
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--profile-out", type=Path, help="keep py-spy's raw stacks in this file")
    parser.add_argument(
        "--profile-blocking",
        action="store_true",
        help="let py-spy pause the process per sample (no stacks cut short; more overhead)",
    )
    args = parser.parse_args(argv)
    wanted = _names(args.rows)
    unknown = sorted(set(wanted + _names(args.profile or "")) - set(names))
    if unknown:
        parser.error(f"--rows/--profile: unknown {unknown}; known: {names}")
    problems = [
        message
        for bad, message in (
            (args.duration < 1, "--duration must be >= 1 s"),
            (args.warmup < 0, "--warmup must be >= 0"),
            (args.light_rate <= 0, "--light-rate must be > 0"),
            (args.passes < 1, "--passes must be >= 1"),
            (args.turns < 1, "--turns must be >= 1"),
            # wrk measures whole seconds: a burst of 2.5 s would run 2 or 3
            (
                args.turns >= 1 and (args.duration / args.turns) % 1 != 0,
                "--duration must be a whole number of seconds per turn (--duration / --turns)",
            ),
        )
        if bad
    ]
    if problems:
        parser.error("; ".join(problems))
    return Options(
        rows=tuple(row for name in wanted for row in ROWS if row.name == name),
        upstream=args.upstream,
        seconds=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        passes=args.passes,
        turns=args.turns,
        light_rows=frozenset(_names(args.light_rows)),
        light_rate=args.light_rate,
        light_seconds=args.light_seconds,
        json_path=args.json_path,
        profile=next((row for row in ROWS if row.name == args.profile), None),
        profile_rate=args.profile_rate,
        profile_out=args.profile_out,
        profile_blocking=args.profile_blocking,
    )


def _names(csv: str) -> list[str]:
    return [name.strip() for name in csv.split(",") if name.strip()]
