"""Where a proxy's added latency goes at light load: its three legs, from packet times.

`bench/run.py` reports the p50 a row adds over direct at a paced 100 req/s. This splits a
row's round trip by the times of its packets on loopback (tcpdump, which needs root):

    in       the request arriving -> the proxy's request to the upstream leaving
    upstream the upstream's own answer (to the proxy, not to wrk)
    out      the upstream's answer arriving -> the proxy's response leaving

Run it at two rates to see how much of a leg is the CPU being cold after an idle gap rather
than work: `bench/hops.py gateway forwarder --rate 100`, then `--rate 1500`. Rows and
upstreams are bench/rows.py's; a shadow's packets are left out (they are off the path).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightload
from options import parse_args
from processes import Fleet
from rows import ROWS, USERS
from run import choose_upstream, running, start_upstreams

_PACKET = re.compile(r"^(\d+\.\d+) IP \S+?\.(\d+) > \S+?\.(\d+): .*length (\d+)")


@dataclass(frozen=True, slots=True)
class Legs:
    exchanges: int
    in_us: float
    upstream_us: float
    out_us: float
    p50_ms: float  # the paced client's own p50, for comparison with bench/run.py


def split(
    packets: list[tuple[float, int, int]], proxy: int, upstreams: set[int]
) -> list[tuple[float, float, float]]:
    """(in, upstream, out) seconds per exchange, from (time, source port, destination port) of
    the packets that carry data, in order. One exchange at a time on one connection."""
    legs: list[tuple[float, float, float]] = []
    seen: dict[str, float] = {}
    for at, source, destination in packets:
        if destination == proxy:
            seen = {"in": at}
        elif destination in upstreams and "in" in seen:
            seen.setdefault("to", at)
        elif source in upstreams and "to" in seen:
            seen.setdefault("from", at)
        elif source == proxy and "from" in seen:
            legs.append((seen["to"] - seen["in"], seen["from"] - seen["to"], at - seen["from"]))
            seen = {}
    return legs


def read_packets(pcap: Path) -> list[tuple[float, int, int]]:
    text = subprocess.run(
        ["tcpdump", "-r", str(pcap), "-nn", "-tt"], capture_output=True, text=True, check=True
    ).stdout
    packets = []
    for line in text.splitlines():
        match = _PACKET.match(line)
        if match and int(match[4]) > 0:
            packets.append((float(match[1]), int(match[2]), int(match[3])))
    return packets


def measure(
    name: str, rate: float, seconds: float, fleet: Fleet, upstreams: dict[str, int]
) -> Legs:
    row = next(r for r in ROWS if r.name == name)
    pcap = fleet.workdir / f"{name}.pcap"
    with running(row, fleet, upstreams) as (port, _pid):
        on_path = {upstreams[role] for role in ("stable", "canary") if role in upstreams}
        ports = " or ".join(f"tcp port {p}" for p in (port, *on_path))
        dump = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-nn", "-s", "128", "-w", str(pcap), ports],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # tcpdump is listening
        latency = lightload.measure(
            port, rate=rate, seconds=seconds, users=USERS if row.users else 0
        )
        time.sleep(0.2)
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    legs = split(read_packets(pcap), port, on_path)
    if not legs:
        raise SystemExit(f"{name}: no complete exchange in the capture")
    columns = list(zip(*legs, strict=True))
    in_us, upstream_us, out_us = (statistics.median(c) * 1e6 for c in columns)
    return Legs(len(legs), in_us, upstream_us, out_us, latency.p50_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    proxies = [r.name for r in ROWS if r.launch is not None]
    parser.add_argument("rows", nargs="+", choices=proxies)
    parser.add_argument("--rate", type=float, default=100.0, help="paced req/s")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if shutil.which("tcpdump") is None:
        print("tcpdump not found: apt-get install tcpdump (and run as root)", file=sys.stderr)
        return 1
    options = parse_args(["--rows", ",".join(args.rows)])
    upstream = choose_upstream(options.upstream)
    if upstream is None:
        return 1
    print(f"paced {args.rate:g} req/s for {args.seconds:g} s per row; medians in us\n")
    print("| row | exchanges | in | upstream | out | in + out | client p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="gateway-hops-") as tmp, Fleet(Path(tmp)) as fleet:
        upstreams = start_upstreams(upstream, fleet, options.rows)
        for name in args.rows:
            legs = measure(name, args.rate, args.seconds, fleet, upstreams)
            print(
                f"| {name} | {legs.exchanges} | {legs.in_us:.0f} | {legs.upstream_us:.0f} "
                f"| {legs.out_us:.0f} | {legs.in_us + legs.out_us:.0f} | {legs.p50_ms:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
