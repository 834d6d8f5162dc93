"""Every metric the gateway exports (DESIGN 9), on a registry the caller passes in.

Names and labels are a contract with deploy/ (dashboard and alert rules). Label values are
bounded: flag keys and variant names come from validated flag documents, `code` is an HTTP
status, `kind`, `reason`, `outcome`, `state` and `stat` are fixed vocabularies. The request
path uses `FlagMeters`, which binds label children once per (flag, variant) so a request costs
one dict lookup and two bound updates.
"""

from __future__ import annotations

import contextlib

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# A `_created` series per counter and histogram child would double what Prometheus stores for
# a timestamp no dashboard or alert reads (DESIGN 9: no `_created` series). The switch is
# process-wide in prometheus_client; the gateway owns its process.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# Time to first token and between streamed events: finer at the low end, up to a minute.
STREAM_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
ROLLOUT_STATES = ("running", "paused", "rolled_back", "promoted")
ROLLBACK_REASONS = ("sprt", "operator")
SHADOW_OUTCOMES = ("ok", "error", "dropped", "unmeasured")
UPSTREAM_ERROR_KINDS = ("connect_error", "timeout", "status_5xx", "bad_response", "mid_body")
# Why the data port closed a connection itself (`limits:` in the settings, DESIGN 10).
REFUSAL_REASONS = ("head_timeout", "keepalive_timeout", "max_connections")


class Metrics:
    """The gateway's metric families, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.build_info = Gauge(
            "gateway_build_info",
            "1, labelled with the gateway's version, HTTP server and upstream client.",
            ["version", "server", "client"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.fast_path = Gauge(
            "gateway_fast_path",
            "1 for the implementation each part of the data plane runs: part is server or "
            "client; a stock impl where a fast one was configured means the fast one did not "
            "load (see the start-up warning).",
            ["part", "impl"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by flag, variant and HTTP status code.",
            ["flag", "variant", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to the last byte of the response, by flag and variant.",
            ["flag", "variant"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures, by kind (connect_error, timeout, status_5xx, ...).",
            ["flag", "variant", "kind"],
            registry=registry,
        )
        self.connections_refused = Counter(
            "gateway_connections_refused",
            "Data-port connections the gateway closed itself, by reason (head_timeout, "
            "keepalive_timeout, max_connections).",
            ["reason"],
            registry=registry,
        )
        for reason in REFUSAL_REASONS:
            self.connections_refused.labels(reason)
        self.canary_weight = Gauge(
            "gateway_canary_weight",
            "Share of units the canary receives now (0 to 1).",
            ["flag"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.rollout_state = Gauge(
            "gateway_rollout_state",
            "1 for the rollout's current state, 0 for the others.",
            ["flag", "state"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.guard_llr = Gauge(
            "gateway_guard_llr",
            "The guard's log-likelihood ratio on the fleet-wide canary counts.",
            ["flag"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.guard_samples = Gauge(
            "gateway_guard_samples",
            "Canary responses in the guard's current test (n).",
            ["flag"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.guard_bound = Gauge(
            "gateway_guard_bound",
            "The guard's bounds now: A (A_i of the current test i) and B.",
            ["flag", "bound"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.rollbacks = Counter(
            "gateway_rollbacks",
            "Rollbacks, by reason (sprt, operator).",
            ["flag", "reason"],
            registry=registry,
        )
        self.shadow_requests = Counter(
            "gateway_shadow_requests",
            "Mirrored requests, by outcome (ok, error, dropped); unmeasured: pairs (one per "
            "metric) left out of the statistics for want of a finite value.",
            ["flag", "shadow", "outcome"],
            registry=registry,
        )
        self.shadow_ttest = Gauge(
            "gateway_shadow_ttest",
            "Shadow minus primary, per metric: n, mean_diff; the paired t-test (valid at a "
            "fixed n) t, p, ci95_low, ci95_high; valid at every look: p_always_valid, "
            "cs95_low, cs95_high.",
            ["flag", "shadow", "metric", "stat"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.shadow_verdict = Gauge(
            "gateway_shadow_verdict",
            "1 shadow higher, -1 lower, 0 no difference shown (always-valid p, Holm over the "
            "flag's comparisons, family-wise 0.01).",
            ["flag", "shadow", "metric"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.flag_store_up = Gauge(
            "gateway_flag_store_up",
            "1 while the flag store answers, 0 while the gateway serves its last snapshot.",
            registry=registry,
            multiprocess_mode="min",
        )
        self.flag_store_sync_age = Gauge(
            "gateway_flag_store_sync_age_seconds",
            "Seconds since the flag snapshot was last confirmed against the store.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.promotions_blocked = Counter(
            "gateway_promotions_blocked",
            "Promotions refused because the promoted document would not validate.",
            ["flag"],
            registry=registry,
        )
        self.snapshot_failures = Counter(
            "gateway_snapshot_failures",
            "Flag changes this replica could not apply (it kept serving the previous one).",
            ["flag"],
            registry=registry,
        )
        self.flag_store_restores = Counter(
            "gateway_flag_store_restores",
            "Times this replica restored a flag store that came back empty (DESIGN 7).",
            registry=registry,
        )
        self.ttft = Histogram(
            "gateway_ttft_seconds",
            "Event streams: time from request to the first event, by flag and variant.",
            ["flag", "variant"],
            buckets=STREAM_BUCKETS,
            registry=registry,
        )
        self.stream_gap = Histogram(
            "gateway_stream_gap_seconds",
            "Event streams: time between arrivals of events, by flag and variant.",
            ["flag", "variant"],
            buckets=STREAM_BUCKETS,
            registry=registry,
        )
        self.completion_tokens = Counter(
            "gateway_completion_tokens",
            "Event streams: completion tokens from the final usage event, by flag and variant.",
            ["flag", "variant"],
            registry=registry,
        )
        self.flags_version = Gauge(
            "gateway_flags_version",
            "Version of each flag document the gateway serves.",
            ["flag"],
            registry=registry,
            multiprocess_mode="max",
        )

    def prepare_flag(self, flag: str, *, has_canary: bool) -> None:
        """Create a flag's event counters at 0 (see VariantMeters)."""
        if has_canary:
            for reason in ROLLBACK_REASONS:
                self.rollbacks.labels(flag, reason)
            self.promotions_blocked.labels(flag)

    def set_rollout_state(self, flag: str, state: str) -> None:
        for candidate in ROLLOUT_STATES:
            self.rollout_state.labels(flag, candidate).set(1.0 if candidate == state else 0.0)

    def forget_flag(self, flag: str, variants: list[str]) -> None:
        """Drop a deleted flag's gauges so dashboards stop showing a stale value."""
        for gauge in (self.canary_weight, self.guard_llr, self.guard_samples, self.flags_version):
            _remove(gauge, flag)
        for bound in ("A", "B"):
            _remove(self.guard_bound, flag, bound)
        for state in ROLLOUT_STATES:
            _remove(self.rollout_state, flag, state)


def _remove(metric: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class VariantMeters:
    """The bound children one (flag, variant) pair updates on every request.

    Series that a dashboard takes `increase()` of are created at 0 when the flag is compiled,
    so their first event counts: Prometheus cannot see a counter's first increment otherwise.
    """

    __slots__ = (
        "_codes", "_flag", "_metrics", "_stream", "_variant", "duration", "errors", "outcomes",
    )  # fmt: skip

    def __init__(self, metrics: Metrics, flag: str, variant: str, *, shadow: bool = False) -> None:
        self._metrics, self._flag, self._variant = metrics, flag, variant
        self._codes: dict[int, Counter] = {}
        self._stream: tuple[Histogram, Histogram, Counter] | None = None  # bound on first use
        self.errors: dict[str, Counter] = {}
        self.outcomes: dict[str, Counter] = {}
        if shadow:  # a shadow answers no user: it has mirror outcomes, not request series
            for outcome in SHADOW_OUTCOMES:
                self.outcomes[outcome] = metrics.shadow_requests.labels(flag, variant, outcome)
            return
        self.duration = metrics.duration.labels(flag, variant)
        for kind in UPSTREAM_ERROR_KINDS:
            self.errors[kind] = metrics.upstream_errors.labels(flag, variant, kind)

    def count(self, status: int) -> None:
        child = self._codes.get(status)
        if child is None:
            child = self._codes[status] = self._metrics.requests.labels(
                self._flag, self._variant, str(status)
            )
        child.inc()

    def error(self, kind: str) -> None:
        child = self.errors.get(kind)
        if child is None:
            child = self.errors[kind] = self._metrics.upstream_errors.labels(
                self._flag, self._variant, kind
            )
        child.inc()

    def stream(self, ttft_s: float | None, gaps: list[float], tokens: int | None) -> None:
        """One event stream's TTFT, gaps and completion tokens."""
        if self._stream is None:
            m, labels = self._metrics, (self._flag, self._variant)
            self._stream = (
                m.ttft.labels(*labels),
                m.stream_gap.labels(*labels),
                m.completion_tokens.labels(*labels),
            )
        ttft, gap, completion = self._stream
        if ttft_s is not None:
            ttft.observe(ttft_s)
        for seconds in gaps:
            gap.observe(seconds)
        if tokens:
            completion.inc(tokens)
