"""The flag document (DESIGN 2): its model, its defaults and its validation.

`parse_flag_set(doc)` turns a loaded YAML/JSON document into frozen models or raises
`InvalidDocument` listing every problem as `path: message`. Checks that involve several fields
sit on the smallest model that owns them and read already-validated siblings, so one broken
field never hides the problems of another.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.core.durations import parse_duration, parse_rate
from gateway.errors import FieldError, InvalidDocument

KEY_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ROLES = ("stable", "canary")


def _check_upstream(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"must not carry credentials, a query or a fragment: {url!r}")
    try:
        parts.port  # noqa: B018 - raises on an out-of-range or non-numeric port
    except ValueError as exc:
        raise ValueError(f"has an invalid port: {url!r}") from exc
    return url.rstrip("/")


def _check_error_kind(kind: str) -> str:
    if kind in ("status_5xx", "status_4xx", "timeout", "connect_error"):
        return kind
    match = re.fullmatch(r"latency_over:(\d+(?:\.\d+)?)", kind)
    if match and float(match.group(1)) > 0:
        return kind
    raise ValueError(
        "must be status_5xx, status_4xx, timeout, connect_error or latency_over:<ms> "
        f"(ms > 0), got {kind!r}"
    )


def _check_metric(metric: str) -> str:
    if metric in ("latency_ms", "error", "agreement"):
        return metric
    if metric.startswith("json:/") or metric == "json:":
        return metric
    raise ValueError(
        f"must be latency_ms, error, agreement or json:/pointer/to/number, got {metric!r}"
    )


def _check_methods(methods: list[str]) -> list[str]:
    upper = [m.upper() for m in methods]
    unknown = sorted(set(upper) - HTTP_METHODS)
    if unknown:
        raise ValueError(f"unknown HTTP method(s) {unknown}; allowed: {sorted(HTTP_METHODS)}")
    return upper


Upstream = Annotated[str, AfterValidator(_check_upstream)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Rate = Annotated[float, BeforeValidator(parse_rate)]
Weight = Annotated[float, Field(ge=0.0, le=1.0)]
Probability = Annotated[float, Field(gt=0.0, lt=1.0)]
Methods = Annotated[list[str], AfterValidator(_check_methods)]
ErrorKind = Annotated[str, AfterValidator(_check_error_kind)]
ShadowMetric = Annotated[str, AfterValidator(_check_metric)]
VariantName = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Route(_Model):
    path_prefix: str = Field(pattern=r"^/")
    host: str | None = None
    methods: Methods | None = None

    @field_validator("host")
    @classmethod
    def _lower_host(cls, host: str | None) -> str | None:
        return host.lower() if host else None


class UnitSource(_Model):
    source: Literal["header", "cookie", "query"] = Field("header", alias="from")
    name: str = Field("x-user-id", min_length=1)
    on_missing: Literal["stable", "random", "cookie"] = "stable"


class Variant(_Model):
    name: VariantName
    upstream: Upstream
    http2: bool = False


class WeightedVariant(Variant):
    weight: Weight


class Step(_Model):
    weight: Weight
    hold: Duration


class StepSchedule(_Model):
    kind: Literal["step"] = "step"
    steps: list[Step] = Field(min_length=1)

    @field_validator("steps")
    @classmethod
    def _ramp_goes_up(cls, steps: list[Step]) -> list[Step]:
        for i in range(1, len(steps)):
            if steps[i].weight < steps[i - 1].weight:
                raise ValueError(
                    f"weights must not decrease along the ramp (steps[{i}].weight "
                    f"{steps[i].weight} < steps[{i - 1}].weight {steps[i - 1].weight})"
                )
        return steps


class ExponentialSchedule(_Model):
    kind: Literal["exponential"]
    p0: float = Field(gt=0.0, le=1.0)
    rate: Rate
    hold_at_full: Duration = 600.0


DEFAULT_STEPS = (
    Step(weight=0.01, hold=300.0),
    Step(weight=0.05, hold=900.0),
    Step(weight=0.25, hold=1800.0),
    Step(weight=1.0, hold=600.0),
)
Schedule = Annotated[StepSchedule | ExponentialSchedule, Field(discriminator="kind")]


class Guard(_Model):
    errors: list[ErrorKind] = Field(
        default_factory=lambda: ["status_5xx", "timeout", "connect_error"], min_length=1
    )
    mode: Literal["absolute", "relative"] = "absolute"
    e0: Probability = 0.01
    e1: Probability = 0.05
    epsilon: Probability = 0.005
    window: Duration = 300.0
    alpha: Probability = 0.01
    beta: Probability = 0.10

    @field_validator("e1")
    @classmethod
    def _e1_above_e0(cls, e1: float, info: ValidationInfo) -> float:
        e0 = info.data.get("e0")
        if e0 is not None and e1 <= e0:
            raise ValueError(f"must be greater than e0 ({e1} <= {e0})")
        return e1

    @field_validator("beta")
    @classmethod
    def _alpha_beta_below_one(cls, beta: float, info: ValidationInfo) -> float:
        alpha = info.data.get("alpha")
        if alpha is not None and alpha + beta >= 1:
            raise ValueError(f"alpha + beta must be below 1 ({alpha} + {beta} >= 1)")
        return beta

    @property
    def latency_threshold_ms(self) -> float | None:
        for kind in self.errors:
            if kind.startswith("latency_over:"):
                return float(kind.split(":", 1)[1])
        return None


class Shadow(Variant):
    sample: Weight = 1.0
    metric: ShadowMetric = "latency_ms"


class Condition(_Model):
    header: str | None = None
    cookie: str | None = None
    query: str | None = None
    equals: str | None = None
    one_of: list[str] | None = Field(None, alias="in")
    unit_in: list[str] | None = None

    @model_validator(mode="after")
    def _one_test(self) -> Self:
        sources = [s for s in ("header", "cookie", "query", "unit_in") if getattr(self, s)]
        if len(sources) != 1:
            raise ValueError("needs exactly one of header, cookie, query or unit_in")
        if sources[0] != "unit_in" and (self.equals is None) == (self.one_of is None):
            raise ValueError(f"{sources[0]} needs exactly one of equals or in")
        if sources[0] == "unit_in" and (self.equals is not None or self.one_of is not None):
            raise ValueError("unit_in takes no equals or in")
        return self


class Rule(_Model):
    when: Condition = Field(alias="if")
    then: str


class Flag(_Model):
    key: str = Field(pattern=KEY_PATTERN)
    route: Route
    unit: UnitSource = UnitSource()
    salt: str | None = Field(None, min_length=1)
    assignment: Literal["buckets", "unleash"] = "buckets"
    stable: Variant
    canary: Variant | None = None
    variants: list[WeightedVariant] = Field(default_factory=list)
    schedule: Schedule = StepSchedule(steps=list(DEFAULT_STEPS))
    advance_requires_evidence: bool = True
    guard: Guard = Guard()
    on_canary_error: Literal["pass", "fallback"] = "pass"
    shadows: list[Shadow] = Field(default_factory=list)
    mirror_methods: Methods = Field(default_factory=lambda: ["GET", "POST"])
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("variants")
    @classmethod
    def _variants_fit(cls, variants: list[WeightedVariant], info: ValidationInfo) -> list[WeightedVariant]:
        total = sum(v.weight for v in variants)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fixed-arm weights sum to {total:g}, more than 1")
        _no_duplicates([*_arm_names(info.data), *(v.name for v in variants)])
        return variants

    @field_validator("shadows")
    @classmethod
    def _shadow_names_unique(cls, shadows: list[Shadow], info: ValidationInfo) -> list[Shadow]:
        _no_duplicates([*_arm_names(info.data), *(s.name for s in shadows)])
        return shadows

    @field_validator("rules")
    @classmethod
    def _rules_name_arms(cls, rules: list[Rule], info: ValidationInfo) -> list[Rule]:
        if "stable" not in info.data or "variants" not in info.data:
            return rules  # the arms themselves are invalid; that error is reported already
        known = {*ROLES, *_arm_names(info.data)}
        for i, rule in enumerate(rules):
            if rule.then not in known:
                raise ValueError(
                    f"rules[{i}].then names unknown variant {rule.then!r}; known: {sorted(known)}"
                )
            if rule.then == "canary" and info.data.get("canary") is None:
                raise ValueError(f"rules[{i}].then is 'canary' but the flag has no canary")
        return rules

    @property
    def bucket_salt(self) -> str:
        return self.salt if self.salt is not None else self.key

    def arm_names(self) -> list[str]:
        """Every variant that can serve traffic: stable, canary, then the fixed arms."""
        return _arm_names({"stable": self.stable, "canary": self.canary, "variants": self.variants})


def _arm_names(data: Mapping[str, Any]) -> list[str]:
    names = []
    if data.get("stable") is not None:
        names.append(data["stable"].name)
    if data.get("canary") is not None:
        names.append(data["canary"].name)
    names.extend(v.name for v in data.get("variants") or [])
    return names


def _no_duplicates(names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate variant name {name!r} within the flag")
        seen.add(name)


class FlagSet(_Model):
    """A validated set of flags, in declared order."""

    flags: tuple[Flag, ...] = ()

    def get(self, key: str) -> Flag | None:
        return next((f for f in self.flags if f.key == key), None)


_FLAG = TypeAdapter(Flag)


def parse_flag(doc: object, *, path: str = "") -> Flag:
    """One flag document, or `InvalidDocument` with every problem under `path`."""
    try:
        return _FLAG.validate_python(doc)
    except ValidationError as exc:
        raise InvalidDocument(_field_errors(exc, path)) from exc


def parse_flag_set(doc: object) -> FlagSet:
    """`{flags: [...]}` into a `FlagSet`, or `InvalidDocument` listing every problem."""
    if doc is None:
        doc = {"flags": []}
    if not isinstance(doc, Mapping):
        raise InvalidDocument([FieldError("$", "expected a mapping with a 'flags' list")])
    errors = [FieldError(str(k), "unknown field") for k in doc if k != "flags"]
    raw = doc.get("flags") or []
    if not isinstance(raw, list):
        raise InvalidDocument([*errors, FieldError("flags", "must be a list of flags")])
    parsed: list[tuple[int, Flag]] = []
    for i, item in enumerate(raw):
        try:
            parsed.append((i, parse_flag(item, path=f"flags[{i}]")))
        except InvalidDocument as exc:
            errors.extend(exc.errors)
    errors.extend(_duplicate_keys(raw))
    errors.extend(route_overlaps(parsed))
    if errors:
        raise InvalidDocument(errors)
    return FlagSet(flags=tuple(flag for _, flag in parsed))


def _duplicate_keys(raw: list[Any]) -> list[FieldError]:
    first: dict[str, int] = {}
    errors = []
    for i, item in enumerate(raw):
        key = item.get("key") if isinstance(item, Mapping) else None
        if not isinstance(key, str):
            continue
        if key in first:
            errors.append(
                FieldError(f"flags[{i}].key", f"duplicate flag key {key!r} (flags[{first[key]}])")
            )
        else:
            first[key] = i
    return errors


def routes_overlap(a: Route, b: Route) -> bool:
    """Two routes could both claim one request at the same prefix length."""
    if a.path_prefix.rstrip("/") != b.path_prefix.rstrip("/"):
        return False
    if a.host is not None and b.host is not None and a.host != b.host:
        return False
    return not (a.methods is not None and b.methods is not None and not set(a.methods) & set(b.methods))


def route_overlaps(indexed: list[tuple[int, Flag]]) -> list[FieldError]:
    """Every flag whose route overlaps an earlier one's, addressed by its index in the file."""
    errors = []
    for j, (index, later) in enumerate(indexed):
        for _, earlier in indexed[:j]:
            if routes_overlap(earlier.route, later.route):
                errors.append(
                    FieldError(
                        f"flags[{index}].route",
                        f"overlaps the route of flag {earlier.key!r} "
                        f"(path_prefix {later.route.path_prefix!r})",
                    )
                )
    return errors


_TAGS = {"step", "exponential"}
_MESSAGES = {"Extra inputs are not permitted": "unknown field"}


def _field_errors(exc: ValidationError, prefix: str) -> list[FieldError]:
    out = []
    for err in exc.errors(include_url=False):
        path = prefix
        loc = err["loc"]
        for i, part in enumerate(loc):
            if isinstance(part, int):
                path += f"[{part}]"
            elif part in _TAGS and i > 0 and loc[i - 1] == "schedule":
                continue  # the discriminator's tag, not a key the user wrote
            else:
                path += f".{part}" if path else str(part)
        message = str(err["msg"]).removeprefix("Value error, ")
        out.append(FieldError(path or "$", _MESSAGES.get(message, message)))
    return out
