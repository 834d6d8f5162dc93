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
import contextlib
import dataclasses
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cpu
import wrk
from processes import Fleet, StartError
from rows import ROWS, USERS_SCRIPT, Launcher, Row, Spot
from run import choose_upstream, running, start_upstreams

ROOT = Path(__file__).resolve().parent.parent
ROW = next(row for row in ROWS if row.name == "gateway-all")


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
    upstream = choose_upstream("auto")
    if upstream is None:
        return 1
    with workspace("gateway-ab-") as (tmp, fleet, stack):
        try:
            upstreams = start_upstreams(upstream, fleet, [ROW])
            contenders = []
            for i, revision in enumerate(args.revisions):
                tree = worktree(revision, tmp / f"tree-{i}", stack)
                row = ROW if tree is None else dataclasses.replace(ROW, launch=_from(tree, ROW))
                # Each its own log: the pair lines of one must not land in another's file.
                row = dataclasses.replace(row, name=f"{ROW.name}-{i}")
                port, pid = stack.enter_context(running(row, fleet, upstreams))
                assert pid is not None
                contenders.append(Contender(f"{i}: {revision}", port, pid))
            _run(contenders, args)
        except (StartError, wrk.WrkError) as exc:
            print(f"failed: {exc}", file=sys.stderr)
            return 1
    _report(contenders, args)
    return 0


def _from(tree: Path, row: Row) -> Launcher:
    """`row`'s command with `tree`'s package first on the path."""
    assert row.launch is not None
    launch = row.launch

    def command(spot: Spot) -> list[str]:
        return ["env", f"PYTHONPATH={tree}", *launch(spot)]

    return command


def _run(contenders: list[Contender], args: argparse.Namespace) -> None:
    shape = {"threads": 1, "connections": args.connections, "script": USERS_SCRIPT}
    for c in contenders:  # warm-up, kept out of the sums
        wrk.run(f"http://127.0.0.1:{c.port}/", seconds=args.burst, **shape)
    for round_ in range(args.rounds):
        order = contenders if round_ % 2 == 0 else contenders[::-1]
        for c in order:
            user, system = cpu.user_system_seconds(c.pid)
            load = wrk.run(f"http://127.0.0.1:{c.port}/", seconds=args.burst, **shape)
            user_after, system_after = cpu.user_system_seconds(c.pid)
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


@contextlib.contextmanager
def workspace(prefix: str) -> Iterator[tuple[Path, Fleet, contextlib.ExitStack]]:
    """A temporary directory, the processes started in it, and a stack of clean-ups (rows,
    worktrees), undone on leaving: the stack first, then the processes, then the directory."""
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as tmp,
        Fleet(Path(tmp)) as fleet,
        contextlib.ExitStack() as stack,
    ):
        yield Path(tmp), fleet, stack


def worktree(revision: str, where: Path, stack: contextlib.ExitStack) -> Path | None:
    """`revision` checked out at `where` until `stack` closes; None for `.` (the working tree)."""
    if revision == ".":
        return None
    git("worktree", "add", "--detach", str(where), revision)
    stack.callback(git, "worktree", "remove", "--force", str(where))
    return where


def git(*args: str) -> None:
    subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
