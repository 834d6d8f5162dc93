"""The fleet-wide state of one shadow comparison (DESIGN 6), as the flag store keeps it.

One (flag, shadow, metric) has, fleet-wide:

- the running (n, mean, M2) of its differences (Chan's merge, `RunningStats`);
- `tau`, the mSPRT's default mixing sd: the sample sd at the first merge that reaches
  `DEFAULT_TAU_AT_N` pairs, then frozen, so that every replica mixes with the same tau and
  later looks never re-tune the test to the data;
- `p_min`, the running minimum of the always-valid p-value over every replica's looks, so the
  p-value anyone reads never rises;
- `unmeasured`, the pairs left out because a side had no finite metric value.

`merge` is the store's atomic step; the Redis store runs the same arithmetic in Lua.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.core.msprt import default_tau
from gateway.core.paired import RunningStats


@dataclass(frozen=True, slots=True)
class Totals:
    stats: RunningStats = field(default_factory=RunningStats)
    tau: float | None = None
    p_min: float = 1.0
    unmeasured: int = 0

    def merge(self, pending: RunningStats, *, unmeasured: int = 0, p_look: float = 1.0) -> Totals:
        """These totals with one replica's pending pairs, unmeasured count and its latest
        always-valid p-value (a look) added."""
        stats = self.stats.merge(pending)
        tau = self.tau if self.tau is not None else default_tau(stats)
        return Totals(stats, tau, min(self.p_min, p_look), self.unmeasured + unmeasured)
