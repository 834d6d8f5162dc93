"""Instructions per request of a row (gateway-all unless `--rows`), for revisions side by side
(callgrind).

Time on this shared virtual machine moves by up to 2x from one minute to the next; the number
of instructions a request executes does not. This serves the gateway-all row of each revision
(as `bench/ab.py` does, from a `git worktree`) under `valgrind --tool=callgrind`, with
instrumentation off until the row has started and taken `--warmup` requests. Then it counts
the instructions of the idle process over `--idle` seconds, and of `--requests` requests sent
on `--connections` keep-alive connections; the idle rate times the requests' wall time is taken
off before dividing, so the timers of the controller, the counter sync and the servers do not
count as request work.

    .venv/bin/python bench/instructions.py HEAD~1 .          # `.` is the working tree
    .venv/bin/python bench/instructions.py . --shadow-sample 1  # every request mirrored
    .venv/bin/python bench/instructions.py . --rows bare,gateway-all-stock-aiohttp

A Python proxy row (`bare`) runs the same for every revision: it is not the gateway's code.

Counts only compare like with like: a request measured alone (one connection) runs a turn of
the event loop of its own, and under load several share one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import http.client
import itertools
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ab import workspace, worktree
from processes import Fleet, StartError, free_port, wait_settled
from rows import GATEWAY, PYTHON, ROWS, USERS, Launcher, Row, Spot, gateway_serve
from run import choose_upstream, start_upstreams

BY_NAME = {row.name: row for row in ROWS}
VALGRIND = shutil.which("valgrind")


@dataclass(slots=True)
class Count:
    label: str
    requests: int = 0
    request_instructions: int = 0  # with the idle share taken off
    idle_per_s: float = 0.0

    @property
    def per_request(self) -> float:
        return self.request_instructions / self.requests if self.requests else 0.0


def main(argv: list[str]) -> int:
    description = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="bench/instructions.py", description=description)
    parser.add_argument("revisions", nargs="+", help="git revisions; `.` is the working tree")
    parser.add_argument("--requests", type=int, default=2000, help="requests counted per revision")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting starts")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--rows", default="gateway-all", help="comma-separated rows: gateway rows or `bare`"
    )
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle counted")
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the callgrind dumps here (callgrind_annotate)"
    )
    parser.add_argument(
        "--shadow-sample", type=float, default=None, help="the shadow's sample (0.1 in the row)"
    )
    args = parser.parse_args(argv)
    rows = [BY_NAME.get(name) for name in args.rows.split(",")]
    if any(row is None or row.launch is None or row.redis for row in rows):
        print(f"--rows: one of {args.rows} is not a row served without Redis", file=sys.stderr)
        return 2
    if VALGRIND is None or shutil.which("callgrind_control") is None:
        print("valgrind not found: apt-get install valgrind", file=sys.stderr)
        return 1
    upstream = choose_upstream("auto")
    if upstream is None:
        return 1
    counts = []
    with workspace("gateway-instructions-") as (tmp, fleet, stack):
        try:
            upstreams = start_upstreams(upstream, fleet, rows)  # type: ignore[arg-type]
            urls = {role: f"http://127.0.0.1:{port}" for role, port in upstreams.items()}
            if args.shadow_sample is not None:
                sampled = gateway_serve(features=True, shadow_sample=args.shadow_sample)
                rows = [dataclasses.replace(BY_NAME["gateway-all"], launch=sampled)]
            for i, revision in enumerate(args.revisions):
                tree = worktree(revision, tmp / f"tree-{i}", stack)
                for row in rows:
                    assert row is not None
                    out = (args.keep or tmp) / f"callgrind-{i}-{row.name}"
                    launch = _under_callgrind(row, tree, out)
                    count = Count(f"{i}: {revision}, {row.name}")
                    with _served(fleet, launch, urls, row.name) as (port, pid):
                        _measure(count, port, pid, out, args)
                    counts.append(count)
                    print(f"# {count.label}: {count.per_request:,.0f} per request", file=sys.stderr)
        except (StartError, CountError, OSError) as exc:
            print(f"failed: {exc}", file=sys.stderr)
            return 1
    _report(counts, args)
    return 0


class CountError(Exception):
    """callgrind_control failed, wrote no dump, or the gateway answered an error."""


def _under_callgrind(row: Row, tree: Path | None, out: Path) -> Launcher:
    """`row`'s command run by python under callgrind, with `tree` first on the path."""
    assert row.launch is not None
    launch = row.launch

    def command(spot: Spot) -> list[str]:
        argv = launch(spot)
        # `gateway` is a script: valgrind runs its interpreter, with the script as argument.
        if argv[0] == str(GATEWAY):
            argv = [str(GATEWAY), *argv[1:]]
        else:
            assert argv[0] == str(PYTHON), argv  # a Python proxy row
            argv = argv[1:]
        valgrind = [
            str(VALGRIND),
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}.%p",
        ]
        env = ["env", f"PYTHONPATH={tree}"] if tree is not None else []
        return [*env, *valgrind, str(PYTHON), *argv]

    return command


@contextlib.contextmanager
def _served(
    fleet: Fleet, launch: Launcher, urls: dict[str, str], name: str
) -> Iterator[tuple[int, int]]:
    port = free_port()
    spot = Spot(port, urls["stable"], fleet.workdir, urls.get("canary", ""), urls.get("shadow", ""))
    child = fleet.start(name, launch(spot), port=port, timeout_s=300.0)
    try:
        # Under valgrind the idle timers take more of a core than natively.
        wait_settled(child, below=0.3, timeout_s=300.0)
        yield port, child.process.pid
    finally:
        fleet.stop(child)


def _measure(count: Count, port: int, pid: int, out: Path, args: argparse.Namespace) -> None:
    _requests(port, args.warmup, args.connections)
    _control("--instr=on", pid)
    _control("--zero", pid)
    time.sleep(args.idle)
    idle = _dump(pid, out)
    count.idle_per_s = idle / args.idle
    started = time.monotonic()
    count.requests = _requests(port, args.requests, args.connections)
    elapsed = time.monotonic() - started
    total = _dump(pid, out)
    count.request_instructions = round(total - count.idle_per_s * elapsed)


def _requests(port: int, requests: int, connections: int) -> int:
    """Send `requests` GETs over `connections` keep-alive connections, each carrying an
    `x-user-id` as the row's wrk load does (bench/users.lua); return how many succeeded."""
    users = itertools.cycle(range(1, USERS + 1))
    left = itertools.count(requests, -1)  # next() is atomic under the GIL
    lock = threading.Lock()

    def client() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120.0)
        done = 0
        try:
            while next(left) > 0:
                with lock:
                    user = next(users)
                conn.request("GET", "/", headers={"x-user-id": f"user-{user}"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise CountError(f"status {response.status} from the gateway")
                done += 1
        finally:
            conn.close()
        return done

    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        return sum(pool.map(lambda _: client(), range(connections)))


def _dump(pid: int, out: Path) -> int:
    """Dump the counts since the last zeroing (and zero them); return the instructions."""
    before = set(out.parent.glob(f"{out.name}.{pid}*"))
    _control("--dump", pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        written = set(out.parent.glob(f"{out.name}.{pid}*")) - before
        for path in written:
            for line in path.read_text().splitlines():
                if line.startswith("totals:") or line.startswith("summary:"):
                    return int(line.split()[1])
        time.sleep(0.2)
    raise CountError(f"no callgrind dump for {pid}")


def _control(option: str, pid: int) -> None:
    done = subprocess.run(
        ["callgrind_control", option, str(pid)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise CountError(f"callgrind_control {option} {pid}: {done.stderr.strip()}")


def _report(counts: list[Count], args: argparse.Namespace) -> None:
    sample = "0.1" if args.shadow_sample is None else f"{args.shadow_sample:g}"
    print(
        f"{args.rows} (gateway shadow sample {sample}) under callgrind: {args.requests:,} requests "
        f"on {args.connections} connection(s) after {args.warmup:,}, "
        f"idle rate over {args.idle:g} s taken off"
    )
    print()
    print("| revision, row | requests | instructions per request | idle instructions per s |")
    print("|---|---:|---:|---:|")
    for c in counts:
        print(f"| {c.label} | {c.requests:,} | {c.per_request:,.0f} | {c.idle_per_s:,.0f} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
