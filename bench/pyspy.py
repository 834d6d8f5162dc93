"""Where the time goes: py-spy on a row's process under wrk, summarised by function.

`record` runs `py-spy record --nonblocking -f raw` (folded stacks: `frame;frame;...;leaf N`,
outermost first, a frame being `function (file:line)`; idle samples are left out, so the
sample count over rate x seconds is how busy the process was). `summarise` folds the lines by
function (the line numbers dropped) and by layer (gateway, uvicorn, aiohttp, ...):

- self: the samples whose innermost Python frame is the function;
- inclusive: the samples with the function anywhere on the stack, counted once per sample.

Time in C (uvloop's loop and socket calls, httptools' parser, orjson, mmh3) has no Python
frame of its own: it is the self time of the innermost Python frame that called it, which for
the event loop is `Runner.run`. `--nonblocking` reads the stacks without pausing the process,
so some stacks come out cut short at the outer end (more of them the deeper the stack): self
shares are exact, inclusive shares are lower bounds, the more so for outer frames (the
request handler, the loop); `--profile-blocking` pauses the process per sample instead.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import wrk

PY_SPY = Path(sys.executable).with_name("py-spy")
TOP = 25
GATEWAY_TOP = 40
# Layers, by the first component of a frame's file (py-spy prints it relative to its root).
LAYERS = {
    "gateway": "gateway",
    "uvicorn": "uvicorn",
    "aiohttp": "aiohttp",
    "yarl": "aiohttp",
    "multidict": "aiohttp",
    "propcache": "aiohttp",
    "aiohappyeyeballs": "aiohttp",
    "httpx": "httpx",
    "httpcore": "httpx",
    "anyio": "httpx",
    "h11": "httpx",
    "prometheus_client": "prometheus_client",
    "asyncio": "event loop",
    "uvloop": "event loop",
    "logging": "logging",
    "redis": "redis",
    "scipy": "scipy",
    "numpy": "scipy",
    "typer": "startup",
}
# The frames every sample sits under (the process's main and the loop's run): not informative.
_STARTUP_FILES = ("gateway/cli/", "gateway/dataplane/server.py", "typer/")
LOOP_FRAMES = ("Runner.run (asyncio/runners.py)", "run (uvloop/__init__.py)")


class ProfileError(Exception):
    """py-spy failed; the message ends with what it said."""


@dataclass(frozen=True, slots=True)
class Entry:
    function: str  # `name (file)`
    layer: str
    self_share: float  # of all samples
    inclusive_share: float


@dataclass(frozen=True, slots=True)
class Profile:
    row: str
    raw: str  # where the folded stacks were written
    rate: int
    seconds: float
    samples: int
    partial: int  # stacks cut short at the outer end (--nonblocking)
    blocking: bool  # py-spy paused the process for each sample
    load: wrk.Load | None  # what wrk measured meanwhile (py-spy shares the cores)
    by_self: tuple[Entry, ...]
    by_inclusive: tuple[Entry, ...]
    layers: tuple[tuple[str, float], ...]  # self share per layer, largest first
    callbacks: tuple[tuple[str, float], ...]  # what the event loop called, inclusive
    gateway: tuple[Entry, ...]  # every gateway function, by inclusive share

    @property
    def busy(self) -> float:
        return self.samples / (self.rate * self.seconds) if self.rate and self.seconds else 0.0


def missing() -> str | None:
    if _executable() is None:
        return "py-spy not found (.venv/bin/pip install py-spy)"
    return None


def record(
    pid: int, out: Path, *, seconds: float, rate: int, subprocesses: bool, blocking: bool = False
) -> None:
    """`py-spy record [--nonblocking] -f raw` on `pid` for `seconds` (and its workers)."""
    argv = [_executable() or "py-spy", "record", "-p", str(pid)]
    argv += ["-d", str(max(1, round(seconds))), "-r", str(rate), "-f", "raw", "-o", str(out)]
    argv += [] if blocking else ["--nonblocking"]
    argv += ["--subprocesses"] if subprocesses else []
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not out.exists():
        raise ProfileError(f"py-spy exited with {done.returncode}: {done.stderr.strip()}")


def summarise(
    raw: Path,
    *,
    row: str,
    load: wrk.Load | None,
    rate: int,
    seconds: float,
    blocking: bool = False,
) -> Profile:
    stacks = list(_stacks(raw.read_text()))
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    callbacks: Counter[str] = Counter()  # complete stacks only: a cut one lacks the loop frame
    for frames, count in stacks:
        leaf = frames[-1]
        own[leaf] += count
        layers[_layer(leaf)] += count
        for function in set(frames):
            anywhere[function] += count
        if frames[0].startswith("<module>"):
            callbacks[_callback(frames)] += count
    complete = sum(callbacks.values()) or 1

    def entry(function: str) -> Entry:
        return Entry(function, _layer(function), own[function] / total, anywhere[function] / total)

    informative = [f for f in anywhere if not _is_startup(f) and f not in LOOP_FRAMES]
    return Profile(
        row=row,
        raw=str(raw),
        rate=rate,
        seconds=seconds,
        samples=total,
        partial=total - sum(callbacks.values()),
        blocking=blocking,
        load=load,
        by_self=tuple(entry(f) for f, _ in own.most_common(TOP)),
        by_inclusive=tuple(entry(f) for f in sorted(informative, key=lambda f: -anywhere[f])[:TOP]),
        layers=tuple((name, n / total) for name, n in layers.most_common()),
        callbacks=tuple((name, n / complete) for name, n in callbacks.most_common(12)),
        gateway=tuple(
            entry(f)
            for f in sorted(informative, key=lambda f: -anywhere[f])
            if _layer(f) == "gateway"
        )[:GATEWAY_TOP],
    )


def render(profile: Profile) -> list[str]:
    load = profile.load
    during = (
        f" under the same wrk load ({load.requests_per_s:,.0f} req/s, p50 {load.p50_ms:.2f} ms "
        "meanwhile: py-spy takes CPU too)"
        if load is not None
        else ""
    )
    lines = [
        f"profile: `py-spy record{'' if profile.blocking else ' --nonblocking'} "
        f"-r {profile.rate} -d {profile.seconds:g} -f raw` "
        f"on {profile.row}{during}; {profile.samples:,} samples, "
        f"the process on CPU {profile.busy:.0%} of the time; "
        f"{profile.partial / profile.samples:.0%} of stacks cut short at the outer end (inclusive "
        "shares are lower bounds, the more so for outer frames; self shares are exact)",
        "",
        "self time by layer (C code counts to the Python frame that called it; "
        "'event loop' is mostly uvloop's C loop and socket calls under Runner.run):",
        "",
        "| layer | self |",
        "|---|---:|",
        *(f"| {name} | {share:.1%} |" for name, share in profile.layers),
        "",
        "what the event loop ran (the frame just above Runner.run), inclusive, of the "
        "complete stacks:",
        "",
        "| callback | inclusive |",
        "|---|---:|",
        *(f"| `{name}` | {share:.1%} |" for name, share in profile.callbacks),
    ]
    lines += _table(f"top {TOP} functions by self time:", profile.by_self)
    lines += _table(f"top {TOP} functions by inclusive time:", profile.by_inclusive)
    lines += _table(f"top {GATEWAY_TOP} gateway functions by inclusive time:", profile.gateway)
    return lines


def _table(title: str, entries: tuple[Entry, ...]) -> list[str]:
    lines = ["", title, "", "| function | layer | self | inclusive |", "|---|---|---:|---:|"]
    lines += [
        f"| `{e.function}` | {e.layer} | {e.self_share:.1%} | {e.inclusive_share:.1%} |"
        for e in entries
    ]
    return lines


def _stacks(text: str) -> list[tuple[list[str], int]]:
    out = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append(([_function(frame) for frame in stack.split(";")], int(count)))
    return out


def _function(frame: str) -> str:
    """`Proxy._handle (gateway/x.py:203)` -> `Proxy._handle (gateway/x.py)`."""
    name, sep, where = frame.rpartition(" (")
    if not sep:
        return frame
    return f"{name} ({where.rstrip(')').rsplit(':', 1)[0]})"


def _file(function: str) -> str:
    return function.rpartition(" (")[2].rstrip(")")


def _layer(function: str) -> str:
    if function in LOOP_FRAMES:
        return "event loop"
    file = _file(function)
    if _is_startup(function):
        return "startup"
    return LAYERS.get(file.split("/", 1)[0].removesuffix(".py"), "stdlib, other")


def _is_startup(function: str) -> bool:
    file = _file(function)
    return file == "gateway" or file.startswith(_STARTUP_FILES) or function.startswith("<module>")


def _callback(frames: list[str]) -> str:
    for i, frame in enumerate(frames[:-1]):
        if frame in LOOP_FRAMES and frames[i + 1] not in LOOP_FRAMES:
            return frames[i + 1]
    if frames[-1] in LOOP_FRAMES:
        return "(the loop itself: uvloop C, socket calls)"
    return "(outside the loop)"


def _executable() -> str | None:
    return str(PY_SPY) if PY_SPY.exists() else shutil.which("py-spy")


def main(argv: list[str]) -> None:
    """`python bench/pyspy.py FILE.raw`: the summary of stacks kept with `--profile-out`."""
    parser = argparse.ArgumentParser(prog="bench/pyspy.py", description=main.__doc__)
    parser.add_argument("raw", type=Path)
    parser.add_argument("--row", default="the profiled process")
    parser.add_argument("--rate", type=int, default=200, help="py-spy -r of the recording")
    parser.add_argument("--seconds", type=float, default=10.0, help="py-spy -d of the recording")
    parser.add_argument("--blocking", action="store_true", help="recorded without --nonblocking")
    args = parser.parse_args(argv)
    profile = summarise(
        args.raw,
        row=args.row,
        load=None,
        rate=args.rate,
        seconds=args.seconds,
        blocking=args.blocking,
    )
    print("\n".join(render(profile)))


if __name__ == "__main__":
    main(sys.argv[1:])
