"""A pass whose rows take turns: every row served at once, wrk bursts on each in rotation.

Rows measured one after another each catch a different stretch of a shared virtual machine,
whose speed for Python code moves by up to 2x from one minute to the next (bench/RESULTS.md),
so a ratio of two rows measured a minute apart carries that drift. Here a pass starts all its
rows, warms each up, then gives them `turns` rounds of `seconds / turns` s of wrk each, the
order reversed every round, and sums each row's requests, time and CPU over its bursts: the
rows of a ratio share the same stretch of time, and the drift falls on both.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import cpu
import wrk
from processes import StartError
from report import Result
from rows import USERS_SCRIPT, Row

# (row) -> a context that serves it and yields (port, pid); run.running, bound to its fleet
Serve = Callable[[Row], AbstractContextManager[tuple[int, int | None]]]


@dataclass(slots=True)
class Tally:
    """One row's bursts within a pass, summed."""

    row: Row
    result: Result
    port: int
    pid: int | None
    requests: int = 0
    seconds: float = 0.0  # wrk's own measure: requests / its req/s, burst by burst
    errors: int = 0
    cpu_s: float = 0.0  # the row's own processes, during its bursts
    foreign_ticks: int = 0  # other processes' CPU during its bursts (cpu.foreign_share)
    total_ticks: int = 0
    p50s: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)

    def add(self, load: wrk.Load, cpu_s: float, before: cpu.Ticks, after: cpu.Ticks) -> None:
        self.requests += load.requests
        self.seconds += load.requests / load.requests_per_s if load.requests_per_s else 0.0
        self.errors += load.errors
        self.cpu_s += cpu_s
        self.foreign_ticks += max(0, (after.busy - before.busy) - (after.ours - before.ours))
        self.total_ticks += after.total - before.total
        self.p50s.append(load.p50_ms)
        self.p99s.append(load.p99_ms)

    def close(self) -> None:
        """Write the sums into the row's result: req/s over all its bursts, the median burst's
        p50 and p99, CPU per request over all of them."""
        if not self.requests or not self.seconds:
            return
        self.result.load = wrk.Load(
            round(self.requests / self.seconds, 2),
            statistics.median(self.p50s),
            statistics.median(self.p99s),
            self.requests,
            self.errors,
        )
        if self.total_ticks > 0:
            self.result.other_cpu = round(self.foreign_ticks / self.total_ticks, 3)
        if self.pid is not None:
            self.result.cpu_us_per_request = round(self.cpu_s / self.requests * 1e6, 1)


def measure(
    rows: tuple[Row, ...],
    serve: Serve,
    *,
    turns: int,
    seconds: float,
    warmup: float,
    connections: int,
    progress: Callable[[str], None],
) -> list[Result]:
    """One result per row, in `rows`' order; a row that cannot run or fails is marked so
    (skipped, failed) and the others go on."""
    results = [Result(row.name, row.what, "ok") for row in rows]
    burst = seconds / turns
    with contextlib.ExitStack() as stack:
        tallies: list[Tally] = []
        for row, result in zip(rows, results, strict=True):
            if reason := row.needs():
                _give_up(result, "skipped", reason, progress)
                continue
            try:
                port, pid = stack.enter_context(serve(row))
            except StartError as exc:
                _give_up(result, "failed", f"did not start: {exc}", progress)
                continue
            tallies.append(Tally(row, result, port, pid))
        names = ", ".join(t.row.name for t in tallies)
        progress(f"taking turns: {names}; {turns} rounds of {burst:g} s each")
        if warmup > 0:
            for tally in list(tallies):
                _burst(tally, warmup, connections, tallies, progress, keep=False)
        for round_ in range(turns):
            for tally in list(tallies if round_ % 2 == 0 else tallies[::-1]):
                _burst(tally, burst, connections, tallies, progress, keep=True)
        for tally in tallies:
            tally.close()
    return results


def _burst(
    tally: Tally,
    seconds: float,
    connections: int,
    tallies: list[Tally],
    progress: Callable[[str], None],
    *,
    keep: bool,
) -> None:
    """wrk on one row for `seconds`, added to its tally when `keep`; a row whose wrk fails is
    marked failed and dropped from `tallies`."""
    script = USERS_SCRIPT if tally.row.users else None
    url = f"http://127.0.0.1:{tally.port}/"
    before, used = cpu.ticks(), _cpu(tally.pid)
    try:
        load = wrk.run(url, threads=1, connections=connections, seconds=seconds, script=script)
    except (wrk.WrkError, OSError) as exc:
        _give_up(tally.result, "failed", str(exc), progress)
        tallies.remove(tally)
        return
    if keep:
        tally.add(load, _cpu(tally.pid) - used, before, cpu.ticks())


def _cpu(pid: int | None) -> float:
    return cpu.tree_seconds(pid) if pid is not None else 0.0


def _give_up(result: Result, status: str, reason: str, progress: Callable[[str], None]) -> None:
    result.status, result.reason, result.load = status, reason, None
    progress(f"{result.name}: {status}: {reason}")
