"""Every metric the gateway exports (DESIGN 9), on a registry the caller passes in.

Names and labels are a contract with deploy/ (dashboard and alert rules). Label values are
bounded: flag keys and variant names come from validated flag documents, `code` is an HTTP
status, `kind`, `reason`, `outcome`, `state` and `stat` are fixed vocabularies. The request
path uses `FlagMeters`, which binds label children once per (flag, variant) so a request costs
one dict lookup and two bound updates.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
ROLLOUT_STATES = ("running", "paused", "rolled_back", "promoted")
ROLLBACK_REASONS = ("sprt", "operator")
SHADOW_OUTCOMES = ("ok", "error", "dropped")
UPSTREAM_ERROR_KINDS = ("connect_error", "timeout", "status_5xx")


class Metrics:
    """The gateway's metric families, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
        self.rollbacks = Counter(
            "gateway_rollbacks",
            "Rollbacks, by reason (sprt, operator).",
            ["flag", "reason"],
            registry=registry,
        )
        self.shadow_requests = Counter(
            "gateway_shadow_requests",
            "Mirrored requests, by outcome (ok, error, dropped).",
            ["flag", "shadow", "outcome"],
            registry=registry,
        )
        self.shadow_ttest = Gauge(
            "gateway_shadow_ttest",
            "Paired t-test of shadow minus primary: t, p, mean_diff, n.",
            ["flag", "shadow", "stat"],
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

    def set_rollout_state(self, flag: str, state: str) -> None:
        for candidate in ROLLOUT_STATES:
            self.rollout_state.labels(flag, candidate).set(1.0 if candidate == state else 0.0)

    def forget_flag(self, flag: str, variants: list[str]) -> None:
        """Drop a deleted flag's gauges so dashboards stop showing a stale value."""
        for gauge in (self.canary_weight, self.guard_llr, self.guard_samples, self.flags_version):
            _remove(gauge, flag)
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

    __slots__ = ("_codes", "_flag", "_metrics", "_variant", "duration", "errors", "outcomes")

    def __init__(self, metrics: Metrics, flag: str, variant: str, *, shadow: bool = False) -> None:
        self._metrics, self._flag, self._variant = metrics, flag, variant
        self._codes: dict[int, Counter] = {}
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
