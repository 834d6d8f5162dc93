"""Revisions of the gateway side by side: CPU per request, in alternating wrk bursts.

Rows measured one after another (`make bench`) each catch a different minute of a shared
virtual machine, whose speed for Python code moves by up to 2x from one minute to the next
(bench/RESULTS.md). To see a change of a few per cent, this serves the gateway-all row of
every revision at once (each from its own `git worktree`, all on one set of upstreams) and
gives them turns: a wrk burst on one, then on the next, the order reversed every round. Each
revision's requests and CPU time (user and system apart) are summed over all its bursts.

    .venv/bin/python bench/ab.py HEAD~1 .            # `.` is the working tree as it is
    .venv/bin/python bench/ab.py HEAD HEAD --rounds 6  # the noise floor: one revision twice
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import wrk
from processes import Fleet, StartError, free_port, wait_settled
from rows import UPSTREAMS, USERS_SCRIPT, Spot, gateway_serve

ROOT = Path(__file__).resolve().parent.parent
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Contender:
    label: str
    port: int
    pid: int
    requests: int = 0
    user_s: float = 0.0
    system_s: float = 0.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/ab.py", description=__doc__.split("\n")[0])
    parser.add_argument("revisions", nargs="+", help="git revisions; `.` is the working tree")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--burst", type=float, default=2.0, help="seconds of wrk per turn")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if wrk.find_wrk() is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 1
    upstream = next((row for row in UPSTREAMS if row.needs() is None), None)
    if upstream is None or upstream.launch is None:
        print("no upstream available (nginx, or the model server)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="gateway-ab-") as tmp, Fleet(Path(tmp)) as fleet:
        trees = [_checkout(rev, Path(tmp) / f"tree-{i}") for i, rev in enumerate(args.revisions)]
        try:
            urls = {}
            for role in ("stable", "canary", "shadow"):
                port = free_port()
                launch = upstream.launch(Spot(port, "", fleet.workdir))
                fleet.start(f"upstream-{role}", launch, port=port)
                urls[role] = f"http://127.0.0.1:{port}"
            contenders = []
            for i, (rev, tree) in enumerate(zip(args.revisions, trees, strict=True)):
                port = free_port()
                spot = Spot(
                    port,
                    urls["stable"],
                    fleet.workdir,
                    canary=urls["canary"],
                    shadow=urls["shadow"],
                )
                command = gateway_serve(features=True)(spot)
                if tree is not None:  # the checkout's package comes first on the path
                    command = ["env", f"PYTHONPATH={tree}", *command]
                child = fleet.start(f"gateway-{i}", command, port=port)
                wait_settled(child)
                contenders.append(Contender(f"{i}: {rev}", port, child.process.pid))
            _run(contenders, args)
        except (StartError, wrk.WrkError) as exc:
            print(f"failed: {exc}", file=sys.stderr)
            return 1
        finally:
            for tree in trees:
                if tree is not None:
                    _git("worktree", "remove", "--force", str(tree))
    _report(contenders, args)
    return 0


def _run(contenders: list[Contender], args: argparse.Namespace) -> None:
    shape = {"threads": 1, "connections": args.connections, "script": USERS_SCRIPT}
    for c in contenders:  # warm-up, kept out of the sums
        wrk.run(f"http://127.0.0.1:{c.port}/", seconds=args.burst, **shape)
    for round_ in range(args.rounds):
        order = contenders if round_ % 2 == 0 else contenders[::-1]
        for c in order:
            user, system = _cpu(c.pid)
            load = wrk.run(f"http://127.0.0.1:{c.port}/", seconds=args.burst, **shape)
            user_after, system_after = _cpu(c.pid)
            c.requests += load.requests
            c.user_s += user_after - user
            c.system_s += system_after - system
        print(f"# round {round_ + 1} of {args.rounds}", file=sys.stderr, flush=True)


def _report(contenders: list[Contender], args: argparse.Namespace) -> None:
    shape = f"{args.rounds} rounds of {args.burst:g} s wrk bursts (-c{args.connections})"
    print(f"gateway-all, {shape}")
    print()
    print("| revision | requests | user us/req | system us/req | CPU us/req |")
    print("|---|---:|---:|---:|---:|")
    for c in contenders:
        user, system = c.user_s / c.requests * 1e6, c.system_s / c.requests * 1e6
        print(f"| {c.label} | {c.requests:,} | {user:.1f} | {system:.1f} | {user + system:.1f} |")


def _cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of `pid` so far (a gateway with one worker)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICKS_PER_S, int(fields[12]) / _TICKS_PER_S


def _checkout(revision: str, where: Path) -> Path | None:
    if revision == ".":
        return None
    _git("worktree", "add", "--detach", str(where), revision)
    return where


def _git(*args: str) -> None:
    subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
