"""What `gateway demo` shows: a live rich view on a terminal, timestamped lines otherwise, and
the closing summary (the same text in both, plus one `summary-json:` line for scripts when
standard output is not a terminal).

The views only render; every figure comes from `gateway.demo.canary` (the gateway's status document,
its Prometheus registry, and the report built from them).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from typing import IO, Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

MAX_EVENTS = 9
ROLES = {"v1": "stable", "v2": "canary"}
LLR_BAR = 32


@dataclass(frozen=True, slots=True)
class Event:
    t: float  # seconds since the rollout started
    text: str


@dataclass(frozen=True, slots=True)
class Frame:
    """One sample of the running demo: the flag's status document and per-variant rates."""

    t: float
    status: dict[str, Any]
    rates: dict[str, float]  # requests/s over the last second, by variant
    error_rates: dict[str, float | None]  # share of 5xx over the last second, by variant
    served: dict[str, int]  # gateway_requests_total, by variant


class View(Protocol):
    def start(self, header: dict[str, Any]) -> None: ...
    def frame(self, frame: Frame) -> None: ...
    def event(self, event: Event) -> None: ...
    def finish(self, report: dict[str, Any]) -> None: ...


def view_for(stream: IO[str]) -> View:
    return LiveView(Console(file=stream)) if stream.isatty() else LineView(stream)


# --- plain lines ------------------------------------------------------------------------------


class LineView:
    """One timestamped line a second, one per event, then the summary and its JSON."""

    def __init__(self, stream: IO[str] = sys.stdout) -> None:
        self._out = stream
        self._t0 = 0.0
        self._next = 0.0
        self._last: Frame | None = None
        self._shown = True  # the last frame has been printed

    def _print(self, t: float, text: str) -> None:
        clock = time.strftime("%H:%M:%S", time.localtime(self._t0 + t))
        self._out.write(f"{clock}  t={t:5.1f}s  {text}\n")
        self._out.flush()

    def start(self, header: dict[str, Any]) -> None:
        self._t0 = header["t0"]
        for line in intro(header):
            self._out.write(line + "\n")
        self._out.flush()

    def frame(self, frame: Frame) -> None:
        self._last, self._shown = frame, frame.t >= self._next
        if self._shown:
            self._next = math.floor(frame.t) + 1.0
            self._print(frame.t, status_line(frame))

    def event(self, event: Event) -> None:
        self._print(event.t, f"** {event.text}")

    def finish(self, report: dict[str, Any]) -> None:
        if self._last is not None and not self._shown:
            self._print(self._last.t, status_line(self._last))
        self._out.write("\n" + "\n".join(summary(report)) + "\n")
        self._out.write("summary-json: " + json.dumps(report, sort_keys=True) + "\n")
        self._out.flush()


def status_line(frame: Frame) -> str:
    s, guard = frame.status, frame.status.get("guard") or {}
    parts = [f"{s['state']:<11}", f"step {_step(s)}", f"w={s['weight']:.0%}".ljust(5)]
    for variant in ("v1", "v2"):
        err = frame.error_rates.get(variant)
        errors = "    -" if err is None else f"{err:5.1%}"
        parts.append(f"{variant} {frame.rates.get(variant, 0.0):5.1f} req/s {errors} 5xx")
    if guard:
        parts.append(f"llr {guard['llr']:+5.2f}")
    parts.append(_shadow_brief(s))
    return "  ".join(parts)


def _step(status: dict[str, Any]) -> str:
    step, steps = status.get("step"), status.get("steps")
    return "-" if step is None else f"{step + 1}/{steps}"


def _shadow_brief(status: dict[str, Any]) -> str:
    shadows = status.get("shadows") or []
    if not shadows:
        return ""
    sh = shadows[0]
    if sh.get("t") is None:
        return f"shadow {sh['shadow']} n={sh['n']}"
    test = f"d={sh['mean_diff']:+.3f} t={sh['t']:.1f} p={sh['p']:.0e}"
    return f"shadow {sh['shadow']} n={sh['n']} {test}"


# --- the live view ------------------------------------------------------------------------------


class LiveView:
    """A rich panel redrawn four times a second; the summary is printed below it at the end."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._live = Live(console=console, refresh_per_second=4, transient=False)
        self._header: dict[str, Any] = {}
        self._frame: Frame | None = None
        self._events: list[Event] = []

    def start(self, header: dict[str, Any]) -> None:
        self._header = header
        for line in intro(header):
            self._console.print(line, highlight=False, markup=False)
        self._live.start()

    def frame(self, frame: Frame) -> None:
        self._frame = frame
        self._live.update(self._render())

    def event(self, event: Event) -> None:
        self._events.append(event)
        if self._frame is not None:
            self._live.update(self._render())

    def finish(self, report: dict[str, Any]) -> None:
        self._live.stop()
        self._console.print()
        for line in summary(report):
            style = "bold green" if line.startswith("Result: OK") else None
            style = "bold red" if line.startswith("Result: NOT") else style
            self._console.print(line, style=style, highlight=False, markup=False)

    def _render(self) -> Panel:
        assert self._frame is not None
        f, h = self._frame, self._header
        s = f.status
        top = Text.assemble(
            (f"t {f.t:5.1f} s of {h['duration_s']:g} s   ", "dim"),
            ("state ", "dim"),
            (f"{s['state']:<13}", _state_style(s["state"])),
            ("step ", "dim"),
            (f"{_step(s):<6}", "bold"),
            ("canary weight ", "dim"),
            _bar(s["weight"], 20),
            (f" {s['weight']:.0%}", "bold"),
        )
        parts: list[Any] = [top, Text(), _traffic_table(f), Text()]
        if s.get("guard"):
            parts.append(_guard_line(s["guard"]))
        parts.append(_shadow_line(s))
        parts.append(Text())
        parts.append(Text("events", style="bold"))
        for event in self._events[-MAX_EVENTS:]:
            parts.append(Text(f"  {event.t:6.2f} s  {event.text}", style=_event_style(event)))
        title = f"gateway demo: canary rollout of flag {s['key']!r}, {s['stable']} → {s['canary']}"
        width = min(118, self._console.width)
        return Panel(Group(*parts), title=title, title_align="left", width=width)


def _traffic_table(f: Frame) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (("variant", "left"), ("role", "left"), ("req/s", "right"),
                          ("5xx (last s)", "right"), ("served", "right")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for variant, role in (("v1", "stable"), ("v2", "canary")):
        err = f.error_rates.get(variant)
        style = "red" if err else None
        table.add_row(
            variant,
            role,
            f"{f.rates.get(variant, 0.0):.1f}",
            Text("-" if err is None else f"{err:.1%}", style=style or ""),
            f"{f.served.get(variant, 0):,}",
        )
    return table


def _guard_line(g: dict[str, Any]) -> Text:
    low, high, llr = g["B"], g["A"], g["llr"]
    at = round((min(max(llr, low), high) - low) / (high - low) * (LLR_BAR - 1))
    bar = ["─"] * LLR_BAR
    zero = round(-low / (high - low) * (LLR_BAR - 1))
    bar[zero] = "┼"
    bar[at] = "●"
    style = "bold red" if llr >= high else ("green" if llr <= low else "yellow")
    return Text.assemble(
        ("guard (SPRT)  ", "bold"),
        (f"n {g['n']:<4} k {g['k']:<3}", ""),
        ("llr ", "dim"),
        (f"{llr:+6.2f}  ", style),
        (f"B {low:+.2f} ├", "dim"),
        ("".join(bar), style),
        (f"┤ A_{g.get('test', 1)} {high:+.2f}  ", "dim"),
        (f"H0 accepted {g.get('accepts', 0)}×  ", "dim"),
        ("REJECTED" if g.get("decision") == "reject" else "", "bold red"),
    )


def _shadow_line(status: dict[str, Any]) -> Text:
    shadows = status.get("shadows") or []
    if not shadows:
        return Text("shadow  none")
    sh = shadows[0]
    head = Text.assemble(("shadow  ", "bold"), f"{sh['shadow']} − served ({sh['metric']})  ")
    if sh.get("t") is None:
        return head.append(f"n {sh['n']}: too few pairs for a test yet", style="dim")
    low, high = sh["ci95"]
    return head.append(
        f"n {sh['n']}  mean {sh['mean_diff']:+.4f}  t {sh['t']:.1f}  p {sh['p']:.1e}  "
        f"95% CI [{low:+.4f}, {high:+.4f}]"
    )


def _bar(share: float, width: int) -> tuple[str, str]:
    full = round(share * width)
    return "█" * full + "░" * (width - full), "cyan"


def _state_style(state: str) -> str:
    return {"running": "bold cyan", "rolled_back": "bold red", "promoted": "bold green"}.get(
        state, "bold yellow"
    )


def _event_style(event: Event) -> str:
    text = event.text
    if "rolled back" in text or "rejected" in text or "degrades" in text or "500" in text:
        return "red"
    return "cyan" if text.startswith("ramp") else ""


# --- what both views print ----------------------------------------------------------------------


def intro(h: dict[str, Any]) -> list[str]:
    g = h["guard"]
    store = "Redis" if h["store"] == "redis" else "the embedded store"
    return [
        f"gateway demo: stable v1, canary v2, shadow v3, on {store}; seed {h['seed']}",
        f"  traffic   {h['rate']:g} req/s from {h['users']:,} users for {h['duration_s']:g} s "
        f"to {h['url']}",
        f"  metrics   {h['metrics_url']} (the gateway's own Prometheus endpoint)",
        f"  ramp      {' → '.join(f'{w:.0%}' for w in h['ramp'])}, each step after "
        f"{h['hold_s']:.3g} s and the guard's evidence",
        f"  canary    fails {h['canary_error_rate']:.0%} of its answers from t = "
        f"{h['degrade_at_s']:.3g} s",
        f"  guard     SPRT e0 {g['e0']:g} vs e1 {g['e1']:g}: test i rolls back at llr ≥ "
        f"A_i = ln(i(i+1)/{g['alpha']:g}) (A_1 = {g['A']:.2f}, A_2 = {g['A2']:.2f}, ...)",
        f"            and is healthy at llr ≤ B = {g['B']:.2f}; a canary failing at most "
        f"{g['e0']:.0%} is rolled back with probability ≤ {g['alpha']:g} in the whole rollout",
        f"  shadow    v3 gets {h['shadow_sample']:.0%} of requests; paired t-test on json:/score",
        "",
    ]


def summary(r: dict[str, Any]) -> list[str]:
    req, m, rb, c = r["requests"], r["metrics"], r["rollback"], r["canary"]
    store = "Redis" if r["store"] == "redis" else "embedded store"
    lines = [
        f"Summary: {r['ran_s']:.1f} s, seed {r['options']['seed']}, {store}"
        + (" (interrupted)" if r["interrupted"] else ""),
        f"  requests  {req['total']:,} from {req['distinct_users']:,} users: "
        + ", ".join(f"{v} ({ROLES.get(v, v)}) {n:,}" for v, n in sorted(m["by_variant"].items()))
        + f" (gateway_requests_total: {m['total']:,})",
        "  ramp      "
        + " → ".join(f"{s['weight']:.0%} at {max(s['at_s'], 0.0):.1f} s" for s in r["ramp"]),
    ]
    if c["requests_since_degrading"]:
        first = c["first_error_at_s"]
        lines.append(
            f"  degraded  at {c['degraded_at_s']:.1f} s (canary error rate "
            f"{r['options']['canary_error_rate']:g})"
            + (f"; its first 500 at {first:.2f} s" if first is not None else "; no 500 yet")
        )
    else:
        lines.append(f"  degraded  never: the canary was to degrade at {c['degraded_at_s']:.1f} s")
    lines += _rollback_lines(rb)
    lines.append(
        f"  errors    users saw {req['user_visible_errors']} errors in {req['total']:,} "
        f"requests; the canary answered {c['errors']} 500s"
    )
    lines += _shadow_lines(r.get("shadow"))
    for text, count in r["gateway_warnings"].items():
        if count > 1:  # shown once while running; the repeats are only counted
            lines.append(f"  warning   {count} times: {text}")
    for i, check in enumerate(r["checks"]):
        mark = "ok  " if check["ok"] else "FAIL"
        lines.append(f"  {'checks' if i == 0 else '':<8}  {mark} {check['name']}")
        if not check["ok"]:
            lines.append(f"                 {check['detail']}")
    lines.append(_result(r))
    return lines


def _rollback_lines(rb: dict[str, Any]) -> list[str]:
    if not rb["happened"]:
        return ["  rollback  none: the canary was never rolled back"]
    g = rb["guard"]
    delay = f"{rb['delay_ms']:.0f} ms after its first 500" if rb["delay_ms"] is not None else ""
    late, late_errors = rb["canary_requests_in_flight"], rb["canary_errors_in_flight"]
    after = f"{late} already on their way ({late_errors} failed), then none" if late else "none"
    test = g.get("test")
    bound = f"A_{test}" if test is not None else "A"
    return [
        f"  rollback  by the {rb['actor']} ({rb['reason']}) at {rb['at_s']:.2f} s, {delay}: "
        f"llr {g['llr']:.2f} ≥ {bound} {g['A']:.2f} (n {g['n']}, k {g['k']})",
        "            in plain words: the canary failed far more often than it may, so the guard "
        "took it out of service",
        f"            the canary served {rb['canary_requests_before']} requests after degrading "
        f"({rb['canary_errors_before']} failed) before the decision; after it {after}",
    ]


def _shadow_lines(sh: dict[str, Any] | None) -> list[str]:
    if sh is None:
        return []
    if sh.get("t") is None:
        return [f"  shadow    {sh['shadow']}: {sh['verdict']} (n {sh['n']})"]
    low, high = sh["ci95"]
    return [
        f"  shadow    {sh['shadow']} − served answer ({sh['metric']}), {sh['n']:,} pairs: mean "
        f"{sh['mean_diff']:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}], t {sh['t']:.1f}, "
        f"p {sh['p']:.1e}",
        f"            verdict: {sh['verdict']}",
    ]


def _result(r: dict[str, Any]) -> str:
    if r["ok"]:
        return (
            "Result: OK: the canary degraded and the guard rolled it back: users are on stable "
            "again (exit 0)"
        )
    return "Result: NOT as intended: see above (exit 1)"
