"""The guard on the request path: a per-request Bernoulli SPRT on canary errors (DESIGN 5).

Each replica counts canary outcomes locally and judges the fleet-wide counts: the last global
state it read from the store plus its own unflushed deltas. The request whose outcome crosses
A_i closes the canary on this replica at once (before the response is even finished) and asks
the controller to write the rollback; crossing B is evidence that the current step is healthy,
and test i + 1 starts at zero against the higher bound A_{i+1}, so alpha bounds the rollout.
A flusher sends the deltas to the store in batches, so the request path never waits on Redis.

Relative mode (DESIGN 5) is a conditional test on where each error came from: an error of
either arm is one trial, 1 if it is the canary's; under H0 that has probability q, the canary's
share of the step's requests counted before the error, under H1 p1 = ratio q/(ratio q + 1 - q).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.core.flags import Guard as GuardConfig
from gateway.core.schedule import Rollout
from gateway.core.sprt import Decision, SprtBounds, alpha_spent, rejection_bound
from gateway.flagstore.base import GuardDelta, GuardState

if TYPE_CHECKING:
    from gateway.dataplane.sse import StreamWatch


def rollout_id(rollout: Rollout) -> str:
    """The name that versions a rollout's guard state: its plan and its start time."""
    return f"{rollout.plan}@{rollout.started_at!r}"


@dataclass(frozen=True, slots=True)
class ErrorPolicy:
    """Which outcomes count as errors for this flag (`guard.errors`)."""

    status_5xx: bool
    status_4xx: bool
    timeout: bool
    connect_error: bool
    latency_over_s: float | None
    stream_aborted: bool = False
    error_event: bool = False
    ttft_over_s: float | None = None
    ttft_kind: str = ""  # "ttft_over:<ms>" as written in the flag

    @classmethod
    def of(cls, config: GuardConfig) -> ErrorPolicy:
        kinds = set(config.errors)
        threshold = config.latency_threshold_ms
        ttft = config.ttft_threshold_ms
        return cls(
            "status_5xx" in kinds,
            "status_4xx" in kinds,
            "timeout" in kinds,
            "connect_error" in kinds,
            threshold / 1000.0 if threshold is not None else None,
            "stream_aborted" in kinds,
            "error_event" in kinds,
            ttft / 1000.0 if ttft is not None else None,
            next((k for k in config.errors if k.startswith("ttft_over:")), ""),
        )

    def kind_of(
        self, status: int, failure: str | None, elapsed_s: float, stream: StreamWatch | None
    ) -> str | None:
        """The `guard.errors` kind this outcome counts as, or None when it is no error.

        On an event stream: an error payload is `error_event`; a stream cut mid-body counts as
        `stream_aborted` whatever the list says (the client saw a failed transfer), one that
        merely ended without `[DONE]` only when `stream_aborted` is listed; TTFT over the
        threshold (or no event at all by then) is `ttft_over:<ms>`.
        """
        if failure is None and stream is None and status < 400:
            # Nearly every answer: only its time can make it an error.
            over = self.latency_over_s
            return "latency_over" if over is not None and elapsed_s > over else None
        if stream is not None and status < 500 and failure not in ("timeout", "connect_error"):
            if stream.error_event and self.error_event:
                return "error_event"
            if stream.cut or (self.stream_aborted and not (stream.done or stream.client_left)):
                return "stream_aborted"
            limit = self.ttft_over_s
            ttft = stream.ttft_s
            if limit is not None and (ttft > limit if ttft is not None else elapsed_s > limit):
                return self.ttft_kind
        if self.is_error(status, failure, elapsed_s):
            if failure in ("timeout", "connect_error"):
                return failure
            if status >= 500:
                return "status_5xx"
            return "status_4xx" if status >= 400 and self.status_4xx else "latency_over"
        return None

    def is_error(self, status: int, failure: str | None, elapsed_s: float) -> bool:
        if failure is not None:
            if failure == "mid_body":
                return True  # the answer broke off after its head: an error whatever the status
            if failure == "timeout":
                return self.timeout
            if failure == "connect_error":
                return self.connect_error
        if status >= 500:
            return self.status_5xx
        if 400 <= status < 500 and self.status_4xx:
            return True
        return self.latency_over_s is not None and elapsed_s > self.latency_over_s


class CanaryGuard:
    """One flag's guard on this replica.

    Guarantees: the decision is taken on the fleet-wide counts of the current test as far as
    this replica knows them (store state plus its own unflushed counts); test i rolls back at
    llr >= A_i = ln(i (i + 1)/alpha); a counted response reaches the store at most once
    (`take_delta` resends an unanswered delta unchanged before anything new).
    """

    def __init__(
        self,
        key: str,
        config: GuardConfig,
        *,
        on_reject: Callable[[CanaryGuard], None],
        on_accept: Callable[[CanaryGuard], None],
    ) -> None:
        self.key = key
        self._on_reject, self._on_accept = on_reject, on_accept
        self.rollout = ""  # which rollout the counts belong to ('' until the controller says)
        self.test = 1
        self.accepts = 0
        self._configure(config)
        self.decision = Decision.CONTINUE
        self.tripped = False  # rejected: stays so until a new rollout resets the guard
        self.llr = 0.0
        # The store's view of the current test and step, as last read.
        self.global_n = self.global_k = 0
        self.global_llr = 0.0
        self.global_arms = [0, 0, 0, 0]  # canary requests, canary errors, stable req., errors
        # Counted here, not yet sent.
        self.pending_n = self.pending_k = 0
        self.pending_llr = 0.0
        self.pending_cn = self.pending_ce = self.pending_sn = self.pending_se = 0
        # Tests ended here (test, accepted, new step) that the store has not heard of yet, in
        # order; the flusher sends them before any delta.
        self.ends: list[tuple[int, bool, bool]] = []
        self.seq = 0
        self.inflight: GuardDelta | None = None
        self.error_kinds: dict[str, int] = {}  # canary errors by kind, this replica, this rollout

    def _configure(self, config: GuardConfig) -> None:
        self.config = config
        self.policy = ErrorPolicy.of(config)
        self.relative = config.mode == "relative"
        self.bounds = SprtBounds(config.e0, config.e1, config.alpha, config.beta)
        self.A = rejection_bound(config.alpha, self.test)
        self.B = self.bounds.B
        self._up, self._down = self.bounds.log_error_ratio, self.bounds.log_success_ratio
        self._log_ratio = math.log(config.ratio)
        self._ratio_less_one = config.ratio - 1.0

    # -- request path ---------------------------------------------------------------------------

    def observe(self, error: bool, kind: str | None = None) -> None:
        """One canary response; may close the canary before this call returns.

        `kind` (what made it an error) is counted for the status, on this replica."""
        if error and kind is not None:
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        if self.relative:
            if error:
                q = self._q()
                if q is not None:
                    self.pending_n += 1
                    self.pending_k += 1
                    self.pending_llr += self._log_ratio - math.log1p(self._ratio_less_one * q)
                    self._judge()
                self.pending_ce += 1
            self.pending_cn += 1
            return
        # Absolute mode, inlined: this runs on every canary response.
        self.pending_n += 1
        self.pending_cn += 1
        if error:
            self.pending_k += 1
            self.pending_ce += 1
        k = self.global_k + self.pending_k
        self.llr = llr = k * self._up + (self.global_n + self.pending_n - k) * self._down
        if llr >= self.A or llr <= self.B:
            self._judge()
        elif self.decision is not Decision.CONTINUE and not self.tripped:
            self.decision = Decision.CONTINUE

    def observe_stable(self, error: bool) -> None:
        """One stable response (relative mode only counts them)."""
        if not self.relative:
            return
        if error:
            q = self._q()
            if q is not None:
                self.pending_n += 1
                self.pending_llr -= math.log1p(self._ratio_less_one * q)
                self._judge()
            self.pending_se += 1
        self.pending_sn += 1

    def _q(self) -> float | None:
        """The canary's share of the step's requests counted so far (None before any)."""
        arms = self.global_arms
        canary = arms[0] + self.pending_cn
        total = canary + arms[2] + self.pending_sn
        return canary / total if total else None

    def _judge(self) -> None:
        if self.relative:
            self.llr = llr = self.global_llr + self.pending_llr
        else:
            n, k = self.global_n + self.pending_n, self.global_k + self.pending_k
            self.llr = llr = self.bounds.llr(n, k)
        if self.tripped:
            return  # decided; canary answers still in flight are counted, not judged again
        if llr >= self.A:
            self.decision = Decision.REJECT
            self.tripped = True
            self._on_reject(self)
        elif llr <= self.B:
            # H0 accepted for test i: test i + 1 starts at once, here and (through the flusher,
            # which sends the end of test i before any new delta) fleet-wide.
            self.accepts += 1
            self._end_test(accepted=True, new_step=False)
            self.decision = Decision.ACCEPT
            self._on_accept(self)
        else:
            self.decision = Decision.CONTINUE

    def _end_test(self, *, accepted: bool, new_step: bool) -> None:
        self.ends.append((self.test, accepted, new_step))
        self._next_test(self.test + 1, new_step=new_step)

    def _next_test(self, test: int, *, new_step: bool) -> None:
        self.test = test
        self.A = rejection_bound(self.config.alpha, test)
        self.global_n = self.global_k = self.pending_n = self.pending_k = 0
        self.global_llr = self.pending_llr = self.llr = 0.0
        if new_step:
            self.global_arms = [0, 0, 0, 0]
            self.pending_cn = self.pending_ce = self.pending_sn = self.pending_se = 0

    # -- controller -----------------------------------------------------------------------------

    def new_step(self) -> None:
        """The rollout moved to its next step: end the current test (the step gate wants
        evidence from the new step) and start the next one, whose bound is A_{i+1}, so the
        alpha the ended test may have spent stays spent."""
        self._end_test(accepted=False, new_step=True)
        self.decision = Decision.CONTINUE if not self.tripped else self.decision

    def restart(self, state: GuardState) -> None:
        """A new rollout (new canary, operator restart) or the first sight of one: adopt the
        store's state for it and forget everything counted for another rollout."""
        self.rollout = state.rollout
        self.tripped = False
        self.decision = Decision.CONTINUE
        self.ends.clear()
        self.error_kinds = {}
        self.inflight = None  # counted for another rollout: the store would drop it anyway
        self.accepts = state.accepts
        self._next_test(state.test, new_step=True)
        self._adopt(state)
        self.llr = self._current_llr()

    def carry_from(self, old: CanaryGuard) -> None:
        """A flag edit that keeps the rollout: keep the running test, judged by this config."""
        config = self.config
        for name in (
            "rollout", "test", "accepts", "decision", "tripped", "llr", "global_n", "global_k",
            "global_llr", "global_arms", "pending_n", "pending_k", "pending_llr", "pending_cn",
            "pending_ce", "pending_sn", "pending_se", "ends", "seq", "inflight", "error_kinds",
        ):  # fmt: skip
            setattr(self, name, getattr(old, name))
        self._configure(config)

    # -- flusher and store ----------------------------------------------------------------------

    @property
    def n(self) -> int:
        return self.global_n + self.pending_n

    @property
    def k(self) -> int:
        return self.global_k + self.pending_k

    def take_delta(self, replica: str) -> GuardDelta | None:
        """The delta to send now: the unanswered one again if there is one (same seq), else
        what was counted since (a new seq), or None when there is nothing to send."""
        if self.inflight is not None:
            return self.inflight
        if not (self.pending_n or self.pending_cn or self.pending_sn):
            return None
        self.seq += 1
        self.inflight = GuardDelta(
            replica=replica,
            seq=self.seq,
            rollout=self.rollout,
            test=self.test,
            n=self.pending_n,
            k=self.pending_k,
            llr=self.pending_llr,
            canary_requests=self.pending_cn,
            canary_errors=self.pending_ce,
            stable_requests=self.pending_sn,
            stable_errors=self.pending_se,
        )
        # Judged from now on as if in the store: the delta is the store's until it says no.
        d = self.inflight
        self.global_n += d.n
        self.global_k += d.k
        self.global_llr += d.llr
        arms = self.global_arms
        arms[0] += d.canary_requests
        arms[1] += d.canary_errors
        arms[2] += d.stable_requests
        arms[3] += d.stable_errors
        self.pending_n = self.pending_k = 0
        self.pending_llr = 0.0
        self.pending_cn = self.pending_ce = self.pending_sn = self.pending_se = 0
        return d

    def delta_applied(self, state: GuardState) -> None:
        """The store answered the in-flight delta (applied now or before, or dropped as old)."""
        self.inflight = None
        self.absorb(state)

    def absorb(self, state: GuardState) -> None:
        """The fleet-wide state after a flush or a read.

        Another rollout's state is the controller's business (see `restart`). A newer test
        means another replica (or a step change) ended ours: adopt it and drop what was counted
        for the old test. An older test means our own end has not reached the store yet (the
        flusher sends it first): keep the local view.
        """
        if state.rollout != self.rollout or state.test < self.test:
            return
        if state.test > self.test:
            new_step = state.step_from > self.test
            self.ends = [end for end in self.ends if end[0] >= state.test]
            self._next_test(state.test, new_step=new_step)
            if not self.tripped:
                self.decision = Decision.CONTINUE
        if not self.ends:  # the store has heard of every test ended here: its count is right
            self.accepts = state.accepts
        self._adopt(state)
        self._judge()

    def _adopt(self, state: GuardState) -> None:
        in_flight = self.inflight
        self.global_n, self.global_k, self.global_llr = state.n, state.k, state.llr
        self.global_arms = [
            state.canary_requests,
            state.canary_errors,
            state.stable_requests,
            state.stable_errors,
        ]
        if in_flight is not None and in_flight.rollout == state.rollout:
            # Not answered yet, so (as far as we know) not in `state`: keep judging with it.
            if in_flight.test == state.test:
                self.global_n += in_flight.n
                self.global_k += in_flight.k
                self.global_llr += in_flight.llr
            if state.step_from <= in_flight.test <= state.test:
                arms = self.global_arms
                arms[0] += in_flight.canary_requests
                arms[1] += in_flight.canary_errors
                arms[2] += in_flight.stable_requests
                arms[3] += in_flight.stable_errors

    def _current_llr(self) -> float:
        if self.relative:
            return self.global_llr + self.pending_llr
        return self.bounds.llr(self.n, self.k)

    def status(self) -> dict[str, object]:
        c = self.config
        status: dict[str, object] = {
            "n": self.n,
            "k": self.k,
            "llr": round(self.llr, 6),
            "A": round(self.A, 6),
            "B": round(self.B, 6),
            "e0": None if self.relative else c.e0,
            "e1": None if self.relative else c.e1,
            "test": self.test,
            "accepts": self.accepts,
            "alpha": c.alpha,
            "alpha_spent": round(alpha_spent(c.alpha, self.test), 9),
            "beta": c.beta,
            "mode": c.mode,
            "decision": self.decision.value,
            "error_kinds": dict(self.error_kinds),
        }
        if self.relative:
            q = self._q()
            status["ratio"] = c.ratio
            status["q"] = None if q is None else round(q, 6)
        return status
