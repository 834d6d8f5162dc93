"""The replica's in-memory snapshot: compiled flags and the router the request path reads.

A `FlagRuntime` is built once per flag version with everything the request path needs
precomputed (assigner, upstream origins and clients, bound metric children). The controller
and the guard update its few mutable fields (`weight`, `canary_open`); the request path never
touches the flag store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.control.guard import CanaryGuard, ErrorPolicy
from gateway.core.assignment import Assigner
from gateway.core.flags import Flag, Shadow, Variant
from gateway.core.lifecycle import plan_of
from gateway.dataplane.upstream import Origin, UpstreamClient, UpstreamPool
from gateway.metrics import Metrics, VariantMeters


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
    metrics: tuple[str, ...] = ()  # shadows only: what the paired tests compare
    mde: dict[str, float] = field(default_factory=dict)  # shadows only: per metric, if set
    model: str | None = None  # replaces the JSON body's "model" on the way to this upstream


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
    models: frozenset[str] | None = None  # route.model: the JSON body's "model" must be one
    reads_body: bool = False  # routing, the unit or an arm's model needs the parsed JSON body
    # Counts an answer given before a variant was assigned (a body-reading flag's request
    # refused while its body was read): variant="" in gateway_requests_total.
    count_unassigned: Callable[[int], None] = lambda status: None
    # What a rollout of this document rolls out (`lifecycle.plan_of`), computed once: the
    # controller compares it on every step.
    plan: str = ""

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
            model=variant.model,
        )

    def shadow(variant: Shadow) -> Arm:
        mirrored = arm(variant, "shadow")
        mirrored.sample, mirrored.metrics = variant.sample, variant.metrics
        for metric in variant.metrics:
            if (mde := variant.mde_for(metric)) is not None:
                mirrored.mde[metric] = mde
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
            m in ("agreement", "completion_tokens") or m.startswith(("json:", "len:"))
            for s in flag.shadows
            for m in s.metrics
        ),
        models=frozenset(route.model) if route.model else None,
        reads_body=bool(route.model)
        or flag.unit.source == "body"
        or any(v.model for v in (flag.stable, flag.canary, *flag.variants, *flag.shadows) if v),
        count_unassigned=lambda status: metrics.requests.labels(flag.key, "", str(status)).inc(),
        plan=plan_of(flag),
    )


def carry_over(old: FlagRuntime, new: FlagRuntime) -> None:
    """Keep per-replica progress (weight, counters, guard) when a flag's document changes.

    A new canary upstream or schedule starts a new rollout; the controller resets the guard
    then. Any other edit keeps the running test, judged from now on by the new guard config.
    """
    new.canary_open = old.canary_open
    # A new canary or schedule is a new rollout, which starts at its first step when the
    # controller next steps it: until then it gets no traffic by weight, not the old one's.
    new.weight = old.weight if new.plan == old.plan else 0.0
    for name, arm in new.arms.items():
        if name in old.arms:
            arm.served = old.arms[name].served
    if old.guard is not None and new.guard is not None:
        new.guard.carry_from(old.guard)


ANY_MODEL = object()


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

    def match(
        self, path: str, host: str | None, method: str, model: object = ANY_MODEL
    ) -> FlagRuntime | None:
        """The flag for this request. A `route.model` flag matches only when `model` (the JSON
        body's "model", None when there is none) is one of its names; with `ANY_MODEL` (the
        body not read yet) it matches, and the caller asks again once it knows the model."""
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
            if flag.models is not None and model is not ANY_MODEL and model not in flag.models:
                continue
            return flag
        return None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.by_key.values())

    def __len__(self) -> int:
        return len(self.by_key)
