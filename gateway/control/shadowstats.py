"""One replica's view of each shadow comparison, and what the status document says of it.

For every (flag, shadow, metric) this replica keeps the fleet-wide `Totals` as last read from
the store, what it measured since (pending, sent on the next flush), its own running minimum
of the always-valid p-value, and its own most recent differences (the Wilcoxon test's sample
with the memory store, where this replica's pairs are the fleet's).

The status entry of a comparison (DESIGN 8) carries the plain paired t-test (`t`, `df`, `p`,
`ci95`: valid at a fixed n, read once), the always-valid p-value and 95 % confidence sequence
(valid at every look), `unmeasured`, the Wilcoxon signed-rank test with the number of pairs it
used, and per metric kind the agreement rate (Wilson) or McNemar's test. `verdicts` then
applies Holm's correction to the always-valid p-values of all of a flag's comparisons.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.core.binary import agreement_rate, discordant, mcnemar
from gateway.core.msprt import DEFAULT_TAU_AT_N, always_valid, holm
from gateway.core.paired import RunningStats, paired_ttest, wilcoxon_test
from gateway.core.totals import Totals

MAX_PENDING_LINES = 10_000  # pair lines kept for the store while it is away
RECENT_PAIRS = 10_000  # own differences kept for the Wilcoxon test (the stream's default cap)
VERDICT_ALPHA = 0.01  # family-wise, over every comparison of a flag


@dataclass(slots=True)
class ShadowStats:
    """One (flag, shadow, metric) comparison on this replica."""

    metric: str
    mde: float | None = None
    fleet: Totals = field(default_factory=Totals)  # fleet-wide, as last read
    published: Totals | None = None  # what the gauges show
    pending: RunningStats = field(default_factory=RunningStats)  # here, not yet merged
    pending_unmeasured: int = 0
    p_min: float = 1.0  # this replica's running minimum of the always-valid p (its looks)
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_PAIRS))
    pairs: int = 0
    lines: list[str] = field(default_factory=list)  # pair lines for the store's capped stream

    def add(self, d: float) -> None:
        """Count one difference (raises ValueError, changing nothing, if it would overflow)."""
        self.pending = self.pending.add(d)
        self.recent.append(d)
        self.pairs += 1

    def keep_line(self, line: str) -> None:
        if len(self.lines) < MAX_PENDING_LINES:
            self.lines.append(line)

    def take_pending(self) -> tuple[RunningStats, int, list[str]]:
        taken = self.pending, self.pending_unmeasured, self.lines
        self.pending, self.pending_unmeasured, self.lines = RunningStats(), 0, []
        return taken

    def restore_pending(self, pending: RunningStats, unmeasured: int, lines: list[str]) -> None:
        """A flush failed: merge back (pairs counted meanwhile are kept too)."""
        self.pending = pending.merge(self.pending)
        self.pending_unmeasured += unmeasured
        self.lines = (lines + self.lines)[-MAX_PENDING_LINES:]

    @property
    def total(self) -> RunningStats:
        return self.fleet.stats.merge(self.pending)

    @property
    def tau(self) -> float | None:
        """The mixing sd: the `mde`, else the fleet's frozen default (None until frozen)."""
        return self.mde if self.mde is not None else self.fleet.tau

    def look(self) -> dict[str, Any]:
        """The always-valid p-value and CS now; the p-value's running minimum moves."""
        tau = self.tau
        av = always_valid(self.total, tau) if tau is not None else None
        if av is None:
            p = self.fleet.p_min if self.fleet.p_min < 1.0 else None
            return {"p_always_valid": p, "cs95": None, "tau": tau}
        self.p_min = min(self.p_min, self.fleet.p_min, av.p)
        return {"p_always_valid": self.p_min, "cs95": list(av.cs95), "tau": tau}

    def report(self, shadow: str, wilcoxon: dict[str, Any] | None = None) -> dict[str, Any]:
        """The status entry; `wilcoxon` is the signed-rank test already run on the fleet's
        pairs (`signed_rank`), else it runs here on this replica's own."""
        total = self.total
        out: dict[str, Any] = {"shadow": shadow, "metric": self.metric, "n": total.n}
        out["unmeasured"] = self.fleet.unmeasured + self.pending_unmeasured
        test = paired_ttest(total)
        blank = {"t": None, "df": None, "p": None, "ci95": None}
        if self.metric == "agreement":  # a rate, not a test of a mean difference
            rate = agreement_rate(total)
            out |= {"mean_diff": total.mean if total.n else None, **blank}
            out |= {"p_always_valid": None, "cs95": None, "tau": None}
            out["agreement"] = rate.as_dict() if rate else None
        else:
            out |= test.as_dict() if test else {"mean_diff": total.mean if total.n else None}
            out |= {} if test else blank
            out |= self.look()
        if self.metric == "error":
            result = mcnemar(*discordant(total))
            out["mcnemar"] = result.as_dict() if result else None
        if self.metric == "agreement":
            out["wilcoxon"] = None  # ranks of a 0/-1 variable say nothing the rate does not
            return out
        out["wilcoxon"] = signed_rank(self.recent, "replica") if wilcoxon is None else wilcoxon
        return out


def signed_rank(diffs: Iterable[float], pairs_from: str) -> dict[str, Any]:
    """The Wilcoxon test's status fields on `diffs`, saying how many pairs it used and whose
    (`store`: the fleet's, `replica`: this replica's own)."""
    sample = list(diffs)
    result = wilcoxon_test(sample)
    fields = result.as_dict() if result else {"pairs": len(sample), "p": None}
    return fields | {"pairs_from": pairs_from}


def verdicts(entries: list[dict[str, Any]], alpha: float = VERDICT_ALPHA) -> None:
    """Adds `verdict` (for people) and `direction` (1 shadow higher, -1 lower, 0 neither) to
    each status entry: Holm's correction over the always-valid p-values of all of them."""
    pvalues = [e.get("p_always_valid") for e in entries]
    m = sum(p is not None for p in pvalues)
    for entry, rejected in zip(entries, holm(pvalues, alpha), strict=True):
        entry["direction"] = 0
        p = entry.get("p_always_valid")
        if entry["metric"] == "agreement":
            rate = entry.get("agreement")
            entry["verdict"] = (
                f"agrees on {rate['rate']:.1%} of pairs "
                f"(95 % CI {rate['wilson95'][0]:.1%} to {rate['wilson95'][1]:.1%})"
                if rate
                else "no pairs yet"
            )
        elif p is None:
            entry["verdict"] = _untested(entry)
        elif rejected:
            higher = entry["mean_diff"] > 0
            entry["direction"] = 1 if higher else -1
            where = "higher" if higher else "lower"
            entry["verdict"] = f"shadow {where} (always-valid p < {alpha:g}, Holm over {m})"
        else:
            entry["verdict"] = f"no difference shown (always-valid p = {p:.3g}, Holm over {m})"


def _untested(entry: dict[str, Any]) -> str:
    """Why a comparison has no always-valid p-value (yet)."""
    n = entry.get("n", 0)
    if n >= 2 and entry.get("t") is None:
        return f"every pair differs by {entry['mean_diff']:+.6g} (no spread: no test)"
    if n >= 2 and entry.get("tau") is None:
        return (
            f"not enough pairs yet: the always-valid test starts at {DEFAULT_TAU_AT_N} pairs "
            "(or set shadows[].mde)"
        )
    return "not enough pairs yet"
