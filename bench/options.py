"""The bench's command line: which rows, how long, how hard."""

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
    light_rows: frozenset[str]
    light_rate: float
    light_seconds: float
    json_path: Path | None


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
    parser.add_argument("--light-rows", default="direct,bare,gateway", help="comma-separated")
    parser.add_argument("--light-rate", type=float, default=100.0, help="req/s at light load")
    parser.add_argument("--light-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, dest="json_path", help="also save results here")
    args = parser.parse_args(argv)
    wanted = _names(args.rows)
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; known: {names}")
    if args.duration < 1 or args.warmup < 0 or args.light_rate <= 0:
        parser.error("--duration must be >= 1 s, --warmup >= 0, --light-rate > 0")
    return Options(
        rows=tuple(row for name in wanted for row in ROWS if row.name == name),
        upstream=args.upstream,
        seconds=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        light_rows=frozenset(_names(args.light_rows)),
        light_rate=args.light_rate,
        light_seconds=args.light_seconds,
        json_path=args.json_path,
    )


def _names(csv: str) -> list[str]:
    return [name.strip() for name in csv.split(",") if name.strip()]
