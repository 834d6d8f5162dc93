"""The guard on the request path: a per-request Bernoulli SPRT on canary errors (DESIGN 5).

Each replica counts canary outcomes locally and judges the fleet-wide counts: the last global
(n, k) it read from the store plus its own unflushed deltas. The request whose outcome crosses
A closes the canary on this replica at once (before the response is even finished) and asks
the controller to write the rollback; crossing B is evidence that the current step is healthy.
A flusher adds the deltas to the store in batches, so the request path never waits on Redis.

Relative mode tests against e0 = max(0.001, stable's error rate over the last window): the
guard keeps (n, k), never the llr, so the bounds can move without losing the evidence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.core.flags import Guard as GuardConfig
from gateway.core.sprt import Decision, SprtBounds, relative_bounds
from gateway.flagstore.base import GuardCounts

_WINDOW_SLOTS = 10


@dataclass(frozen=True, slots=True)
class ErrorPolicy:
    """Which outcomes count as errors for this flag (`guard.errors`)."""

    status_5xx: bool
    status_4xx: bool
    timeout: bool
    connect_error: bool
    latency_over_s: float | None

    @classmethod
    def of(cls, config: GuardConfig) -> ErrorPolicy:
        kinds = set(config.errors)
        threshold = config.latency_threshold_ms
        return cls(
            "status_5xx" in kinds,
            "status_4xx" in kinds,
            "timeout" in kinds,
            "connect_error" in kinds,
            threshold / 1000.0 if threshold is not None else None,
        )

    def is_error(self, status: int, failure: str | None, elapsed_s: float) -> bool:
        if failure is not None:
            if failure == "timeout":
                return self.timeout
            if failure == "connect_error":
                return self.connect_error
        if status >= 500:
            return self.status_5xx
        if 400 <= status < 500 and self.status_4xx:
            return True
        return self.latency_over_s is not None and elapsed_s > self.latency_over_s


class StableWindow:
    """Stable's error rate over a sliding window, in slots, for relative mode."""

    __slots__ = ("_errors", "_requests", "_slot", "_slot_s")

    def __init__(self, window_s: float) -> None:
        self._slot_s = max(window_s / _WINDOW_SLOTS, 0.001)
        self._slot = 0
        self._requests = [0] * _WINDOW_SLOTS
        self._errors = [0] * _WINDOW_SLOTS

    def observe(self, error: bool, now: float) -> None:
        self._roll(now)
        i = self._slot % _WINDOW_SLOTS
        self._requests[i] += 1
        if error:
            self._errors[i] += 1

    def rate(self, now: float) -> float:
        self._roll(now)
        total = sum(self._requests)
        return sum(self._errors) / total if total else 0.0

    def _roll(self, now: float) -> None:
        slot = int(now / self._slot_s)
        while self._slot < slot:
            self._slot += 1
            i = self._slot % _WINDOW_SLOTS
            self._requests[i] = self._errors[i] = 0
            if slot - self._slot >= _WINDOW_SLOTS:
                self._slot = slot - _WINDOW_SLOTS


class CanaryGuard:
    """One flag's guard on this replica."""

    def __init__(
        self,
        key: str,
        config: GuardConfig,
        *,
        on_reject: Callable[[CanaryGuard], None],
        on_accept: Callable[[CanaryGuard], None],
    ) -> None:
        self.key = key
        self.config = config
        self.policy = ErrorPolicy.of(config)
        self.relative = config.mode == "relative"
        self.bounds = SprtBounds(config.e0, config.e1, config.alpha, config.beta)
        self.stable_window = StableWindow(config.window) if self.relative else None
        self._on_reject, self._on_accept = on_reject, on_accept
        self.global_n = self.global_k = 0
        self.epoch = 0
        self.pending_n = self.pending_k = 0  # counted here, not yet added to the store
        self.decision = Decision.CONTINUE
        self.llr = 0.0
        self.accepts = 0
        self.tripped = False  # rejected: stays so until a new rollout resets the guard
        self.reset_from: int | None = None  # epoch this replica restarted from, to tell the store

    # -- request path ---------------------------------------------------------------------------

    def observe(self, error: bool) -> None:
        """One canary response; may close the canary before this call returns."""
        self.pending_n += 1
        if error:
            self.pending_k += 1
        self._judge()

    def observe_stable(self, error: bool) -> None:
        if self.stable_window is not None:
            self.stable_window.observe(error, time.monotonic())

    # -- flusher and store ----------------------------------------------------------------------

    @property
    def n(self) -> int:
        return self.global_n + self.pending_n

    @property
    def k(self) -> int:
        return self.global_k + self.pending_k

    def take_pending(self) -> tuple[int, int]:
        n, k = self.pending_n, self.pending_k
        self.pending_n = self.pending_k = 0
        return n, k

    def restore_pending(self, n: int, k: int) -> None:
        """A flush failed (store away): keep the deltas for the next one."""
        self.pending_n += n
        self.pending_k += k

    def absorb(self, counts: GuardCounts) -> None:
        """The fleet-wide counts after a flush or a read.

        A newer epoch means another replica restarted the test: adopt it and drop the deltas
        counted for the old one. An older epoch means our own restart has not reached the
        store yet (the flusher sends it first): keep the local view.
        """
        if counts.epoch < self.epoch:
            return
        if counts.epoch > self.epoch:
            self.epoch = counts.epoch
            self.pending_n = self.pending_k = 0
        self.global_n, self.global_k = counts.n, counts.k
        self._judge()

    def restart(self, counts: GuardCounts) -> None:
        """A new rollout or step (or an operator restart): forget the old test entirely."""
        self.tripped = False
        self.decision = Decision.CONTINUE
        self.reset_from = None
        self.epoch = counts.epoch
        self.global_n, self.global_k = counts.n, counts.k
        self.pending_n = self.pending_k = 0
        self.llr = self.bounds.llr(self.n, self.k)

    def refresh_bounds(self) -> None:
        """Relative mode: move e0 to stable's recent error rate (the counts are kept)."""
        if self.stable_window is None:
            return
        c = self.config
        rate = self.stable_window.rate(time.monotonic())
        self.bounds = relative_bounds(rate, epsilon=c.epsilon, alpha=c.alpha, beta=c.beta)
        self._judge()

    def _judge(self) -> None:
        bounds = self.bounds
        n, k = self.global_n + self.pending_n, self.global_k + self.pending_k
        self.llr = llr = bounds.llr(n, k)
        if self.tripped:
            return  # decided; canary answers still in flight are counted, not judged again
        if llr >= bounds.A:
            self.decision = Decision.REJECT
            self.tripped = True
            self._on_reject(self)
        elif llr <= bounds.B:
            # H0 accepted: the test restarts at once, here and (through the flusher, which
            # sends `reset_from` before any new delta) fleet-wide.
            self.decision = Decision.ACCEPT
            self.accepts += 1
            if self.reset_from is None:
                self.reset_from = self.epoch
            self.epoch = self.reset_from + 1
            self.global_n = self.global_k = self.pending_n = self.pending_k = 0
            self._on_accept(self)

    def status(self) -> dict[str, object]:
        b = self.bounds
        return {
            "n": self.n,
            "k": self.k,
            "llr": round(self.llr, 6),
            "A": round(b.A, 6),
            "B": round(b.B, 6),
            "e0": b.e0,
            "e1": b.e1,
            "alpha": b.alpha,
            "beta": b.beta,
            "mode": self.config.mode,
            "decision": self.decision.value,
            "epoch": self.epoch,
            "accepts": self.accepts,
        }
