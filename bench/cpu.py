"""How much of the machine other work took while a row ran (Linux /proc; zero elsewhere).

On a shared 2-core machine a neighbour's test run halves a row's req/s. Every number here
comes with the share of all CPU time spent by processes outside the bench (not this script,
wrk, or the children and their workers), so a reader can tell a clean row from a squeezed one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class Ticks:
    busy: int  # all CPUs, clock ticks in user, system or stolen
    total: int  # all CPUs, clock ticks
    ours: int  # this process and its descendants, reaped ones included


def ticks() -> Ticks:
    try:
        fields = [int(n) for n in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return Ticks(0, 0, 0)
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields[:8]
    # Interrupt time belongs to no process; on loopback it is mostly our own packets, so it is
    # left out rather than blamed on others. Steal (the hypervisor's other guests) is not ours.
    busy = user + nice + system + steal
    return Ticks(busy, sum(fields[:8]), _family_ticks(os.getpid()))


def foreign_share(before: Ticks, after: Ticks) -> float:
    """Share of all CPU time between two samples used by processes that are not ours."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    foreign = (after.busy - before.busy) - (after.ours - before.ours)
    return round(max(0.0, foreign / total), 3)


def tree_seconds(pid: int) -> float:
    """CPU seconds used so far by `pid` and its descendants (a proxy and its workers)."""
    return _family_ticks(pid) / _TICKS_PER_S


def busy_share(seconds: float = 1.0) -> float:
    """Share of all CPU time in use over the next `seconds` (we sleep meanwhile)."""
    before = ticks()
    time.sleep(seconds)
    after = ticks()
    total = after.total - before.total
    return round((after.busy - before.busy) / total, 3) if total > 0 else 0.0


def _family_ticks(root: int) -> int:
    """utime + stime + cutime + cstime of `root` and every live descendant."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            parsed = _stat(entry / "stat")
            if parsed is not None:
                stats[int(entry.name)] = parsed
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return total


def user_system_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds used so far by `pid` itself (its threads included)."""
    fields = _fields(PROC / str(pid) / "stat")
    if fields is None:
        return 0.0, 0.0
    return int(fields[11]) / _TICKS_PER_S, int(fields[12]) / _TICKS_PER_S


def _stat(path: Path) -> tuple[int, int] | None:
    fields = _fields(path)
    if fields is None:
        return None
    ppid = int(fields[1])
    return ppid, sum(int(n) for n in fields[11:15])  # utime stime cutime cstime


def _fields(path: Path) -> list[str] | None:
    """The fields of a /proc/PID/stat after the command name, from the state on."""
    try:
        text = path.read_text()
    except OSError:
        return None  # the process went away
    # The command name may contain spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2 :].split()
