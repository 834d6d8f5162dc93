"""The replica's in-memory snapshot: compiled flags and the router the request path reads.

A `FlagRuntime` is built once per flag version with everything the request path needs
precomputed (assigner, upstream origins and clients, bound metric children). The controller
and the guard update its few mutable fields (`weight`, `canary_open`); the request path never
touches the flag store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.core.assignment import Assigner
from gateway.core.flags import Flag, Shadow, Variant
from gateway.guard import CanaryGuard, ErrorPolicy
from gateway.metrics import Metrics, VariantMeters
from gateway.upstream import Origin, UpstreamClient, UpstreamPool


@dataclass(slots=True, eq=False)
class Arm:
    """One variant that can serve traffic, resolved to its upstream."""

    name: str
    role: str  # stable | canary | variant
    origin: Origin
    client: UpstreamClient
    meters: VariantMeters
    header_value: bytes  # the variant's name as sent in x-gateway-variant
    served: int = 0
    sample: float = 0.0  # shadows only: the share of requests mirrored to it
    metric: str = ""  # shadows only: what the paired test compares


@dataclass(slots=True, eq=False)
class FlagRuntime:
    flag: Flag
    version: int
    assigner: Assigner
    arms: dict[str, Arm]
    stable: Arm
    canary: Arm | None
    prefix: str  # path prefix without its trailing slash
    host: str | None
    methods: frozenset[str] | None
    weight: float = 0.0
    canary_open: bool = True
    guard: CanaryGuard | None = None
    errors: ErrorPolicy | None = None
    fallback: bool = False
    shadows: list[Arm] = field(default_factory=list)
    mirror_methods: frozenset[str] = frozenset()
    shadows_want_body: bool = False  # a shadow metric reads the primary's response body

    @property
    def key(self) -> str:
        return self.flag.key

    def traffic(self) -> dict[str, int]:
        return {name: arm.served for name, arm in self.arms.items()}


GuardFactory = Callable[[Flag], CanaryGuard]


def compile_flag(
    flag: Flag, version: int, *, pool: UpstreamPool, metrics: Metrics, guard: GuardFactory
) -> FlagRuntime:
    def arm(variant: Variant, role: str) -> Arm:
        origin = Origin.parse(variant.upstream, http2=variant.http2)
        return Arm(
            name=variant.name,
            role=role,
            origin=origin,
            client=pool.client_for(origin),
            meters=VariantMeters(metrics, flag.key, variant.name, shadow=role == "shadow"),
            header_value=variant.name.encode(),
        )

    def shadow(variant: Shadow) -> Arm:
        mirrored = arm(variant, "shadow")
        mirrored.sample, mirrored.metric = variant.sample, variant.metric
        return mirrored

    metrics.prepare_flag(flag.key, has_canary=flag.canary is not None)
    stable = arm(flag.stable, "stable")
    canary = arm(flag.canary, "canary") if flag.canary else None
    arms = {stable.name: stable}
    if canary is not None:
        arms[canary.name] = canary
    for v in flag.variants:
        arms[v.name] = arm(v, "variant")
    route = flag.route
    return FlagRuntime(
        flag=flag,
        version=version,
        assigner=Assigner(flag),
        arms=arms,
        stable=stable,
        canary=canary,
        prefix=route.path_prefix.rstrip("/"),
        host=route.host,
        methods=frozenset(route.methods) if route.methods else None,
        guard=guard(flag) if canary is not None else None,
        errors=ErrorPolicy.of(flag.guard),
        fallback=flag.on_canary_error == "fallback",
        shadows=[shadow(s) for s in flag.shadows],
        mirror_methods=frozenset(flag.mirror_methods),
        shadows_want_body=any(
            s.metric != "latency_ms" and s.metric != "error" for s in flag.shadows
        ),
    )


def carry_over(old: FlagRuntime, new: FlagRuntime) -> None:
    """Keep per-replica progress (weight, counters, guard) when a flag's document changes.

    A new canary upstream or schedule starts a new rollout; the controller resets the guard
    then. Any other edit keeps the running test, judged from now on by the new guard config.
    """
    new.weight, new.canary_open = old.weight, old.canary_open
    for name, arm in new.arms.items():
        if name in old.arms:
            arm.served = old.arms[name].served
    if old.guard is not None and new.guard is not None:
        g, o = new.guard, old.guard
        g.global_n, g.global_k, g.epoch = o.global_n, o.global_k, o.epoch
        g.pending_n, g.pending_k, g.reset_from = o.pending_n, o.pending_k, o.reset_from
        g.tripped, g.decision, g.llr, g.accepts = o.tripped, o.decision, o.llr, o.accepts


class Router:
    """Longest path prefix wins; host and methods narrow a route when set.

    A prefix matches whole path segments: `/v1/sentiment` serves `/v1/sentiment` and
    `/v1/sentiment/batch`, not `/v1/sentimental`.
    """

    __slots__ = ("_ordered", "by_key", "needs_host")

    def __init__(self, flags: list[FlagRuntime]) -> None:
        self.by_key = {f.key: f for f in flags}
        self._ordered = sorted(flags, key=lambda f: len(f.prefix), reverse=True)
        self.needs_host = any(f.host is not None for f in flags)

    def match(self, path: str, host: str | None, method: str) -> FlagRuntime | None:
        for flag in self._ordered:
            prefix = flag.prefix
            if prefix and not (
                path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")
            ):
                continue
            if flag.host is not None and flag.host != host:
                continue
            if flag.methods is not None and method not in flag.methods:
                continue
            return flag
        return None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.by_key.values())

    def __len__(self) -> int:
        return len(self.by_key)
