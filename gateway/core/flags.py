"""The flag document (DESIGN 2): its model, its defaults and its validation.

`parse_flag_set(doc)` turns a loaded YAML/JSON document into frozen models or raises
`InvalidDocument` listing every problem as `path: message`; `parse_flag(doc)` does the same for
one flag (the admin API's PUT body). Nothing else ever escapes them, whatever the input.

How every problem gets reported at once: pydantic checks each field on its own and keeps going
after a failure. Rules that tie several fields together (e0 < e1, names unique within a flag, a
rule naming a known variant, ...) are `_problems(data)` hooks that read the *raw* input, so they
run even when an unrelated sibling is broken; a value that is itself invalid is skipped there,
because its own error is already reported. `_Model`'s wrap validator merges both lists.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from gateway.core.documents import load_json
from gateway.core.durations import brief as _brief
from gateway.core.durations import parse_duration, parse_rate
from gateway.errors import FieldError, InvalidDocument

KEY_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ROLES = ("stable", "canary")
ERROR_KINDS = (
    "status_5xx", "status_4xx", "timeout", "connect_error", "stream_aborted", "error_event",
)  # fmt: skip
METRICS = ("latency_ms", "error", "agreement", "ttft_ms", "completion_tokens", "stream_gap_p99_ms")

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]

# --- one value at a time ------------------------------------------------------------------------


def _check_key(key: str) -> str:
    if not re.fullmatch(KEY_PATTERN, key):
        raise ValueError(
            "must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or "
            f"digit, got {_brief(key)}"
        )
    return key


def _check_name(name: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(
            "must be 1-63 characters of letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit, got {_brief(name)}"
        )
    return name


def _check_path_prefix(prefix: str) -> str:
    if not prefix.startswith("/") or re.search(r"[\s?#]", prefix):
        raise ValueError(
            f"must be a URL path starting with '/' (no query or spaces), got {_brief(prefix)}"
        )
    # A request path is matched as it arrives, never normalised: a dot segment could only
    # match a path that some upstream resolves to somewhere else.
    if "%2e" in prefix.lower() or any(s in (".", "..") for s in prefix.split("/")):
        raise ValueError(
            f"must not contain a '.' or '..' segment or an encoded dot (%2e), got {_brief(prefix)}"
        )
    return prefix


def _check_host(host: str | None) -> str | None:
    if host is not None and not re.fullmatch(r"[^\s/?#@]+", host):
        raise ValueError(
            f"must be a host name such as api.example.com (no scheme), got {_brief(host)}"
        )
    return host.lower() if host is not None else None


def _check_upstream(url: str) -> str:
    if re.search(r"\s", url):
        raise ValueError(f"must be an http:// or https:// URL without spaces, got {_brief(url)}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced [ or characters NFKC turns into / ? # @
        raise ValueError(f"is not a valid URL ({exc}): {_brief(url)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {_brief(url)}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"must not carry credentials, a query or a fragment: {_brief(url)}")
    try:
        parts.port  # noqa: B018 - raises on an out-of-range or non-numeric port
    except ValueError as exc:
        raise ValueError(f"has an invalid port: {_brief(url)}") from exc
    return url.rstrip("/")


def _check_error_kind(kind: str) -> str:
    if kind in ERROR_KINDS:
        return kind
    match = re.fullmatch(r"(?:latency|ttft)_over:(\d+(?:\.\d+)?)", kind)
    if match and 0 < float(match.group(1)) < math.inf:
        return kind
    raise ValueError(
        "must be status_5xx, status_4xx, timeout, connect_error, stream_aborted, error_event, "
        f"latency_over:<ms> or ttft_over:<ms> (ms > 0), got {_brief(kind)}"
    )


def _check_metric(metric: str) -> str:
    pointer = metric.removeprefix("len:").removeprefix("json:")
    if metric in METRICS or (
        metric.removeprefix("len:").startswith("json:")
        and (pointer == "" or pointer.startswith("/"))
        and not re.search(r"~(?![01])", pointer)
    ):
        return metric
    raise ValueError(
        "must be latency_ms, error, agreement or json:/pointer/to/number, or on streams "
        f"ttft_ms, completion_tokens, stream_gap_p99_ms or len:json:/pointer, got {_brief(metric)}"
    )


def _check_methods(methods: list[str]) -> list[str]:
    upper = [m.upper() for m in methods]
    unknown = sorted(set(upper) - HTTP_METHODS)
    if unknown:
        raise ValueError(f"unknown HTTP method(s) {unknown}; allowed: {sorted(HTTP_METHODS)}")
    return upper


def _strict_number(value: object) -> object:
    # pydantic's lax float takes `true` as 1.0 and "0.5" as 0.5; a YAML `weight: yes` is a
    # mistake, not 100 %, and a quoted number is a string the operator did not mean.
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    if isinstance(value, str):
        raise ValueError(f"must be a number, got the string {_brief(value)}{_number_hint(value)}")
    return value


def _number_hint(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    if re.fullmatch(r"\s*[-+]?\d+[eE][-+]?\d+\s*", text):
        # YAML 1.1 reads 1e-2 as a string: its floats need a dot (1.0e-2)
        return f" (YAML reads {text.strip()} without a dot as a string): write {number!r}"
    return f": write {number!r} without quotes"


def _strict_bool(value: object) -> object:
    # pydantic's lax bool takes "yes", "on", 1 and "true": only true and false are booleans
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_brief(value)}")
    return value


def _none_is_empty(value: object) -> object:
    return [] if value is None else value  # `shadows:` with every entry commented out


Key = Annotated[str, AfterValidator(_check_key)]
VariantName = Annotated[str, AfterValidator(_check_name)]
Upstream = Annotated[str, AfterValidator(_check_upstream)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Rate = Annotated[float, BeforeValidator(parse_rate)]
Number = Annotated[float, BeforeValidator(_strict_number)]
Bool = Annotated[bool, BeforeValidator(_strict_bool)]
Weight = Annotated[Number, Field(ge=0.0, le=1.0)]
Probability = Annotated[Number, Field(gt=0.0, lt=1.0)]
Methods = Annotated[list[str], AfterValidator(_check_methods)]
ErrorKind = Annotated[str, AfterValidator(_check_error_kind)]
ShadowMetric = Annotated[str, AfterValidator(_check_metric)]


# --- the models ---------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    @classmethod
    def _problems(cls, data: Mapping[Any, Any]) -> list[Problem]:
        """Rules across several fields, read from the raw input; locations relative to `cls`."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _report_everything(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        problems = cls._problems(data) if isinstance(data, Mapping) else []
        if not problems:
            return handler(data)
        try:
            handler(data)
        except ValidationError as exc:
            raise _validation_error(cls.__name__, exc.errors(), problems) from None
        raise _validation_error(cls.__name__, [], problems)


def _one_or_more(value: object) -> object:
    return [value] if isinstance(value, str) else value  # `model: NAME` is `model: [NAME]`


ModelName = Annotated[str, Field(min_length=1, max_length=256)]
ModelNames = Annotated[list[ModelName], Field(min_length=1)]


class Route(_Model):
    path_prefix: Annotated[str, AfterValidator(_check_path_prefix)]
    host: Annotated[str | None, AfterValidator(_check_host)] = None
    methods: Annotated[Methods | None, Field(min_length=1)] = None
    # Matches the JSON request body's "model" (a string equal to one of these names).
    model: Annotated[ModelNames | None, BeforeValidator(_one_or_more)] = None


class UnitSource(_Model):
    source: Literal["header", "cookie", "query", "body"] = Field("header", alias="from")
    name: str = Field("x-user-id", min_length=1)  # with `from: body`, a JSON pointer
    on_missing: Literal["stable", "random", "cookie"] = "stable"

    @model_validator(mode="before")
    @classmethod
    def _body_default(cls, data: Any) -> Any:
        # The OpenAI API's own end-user field, when the body is the source and no name is given.
        if isinstance(data, Mapping) and data.get("from") == "body" and "name" not in data:
            return {**data, "name": "/user"}
        return data

    @classmethod
    def _problems(cls, data: Mapping[Any, Any]) -> list[Problem]:
        name = data.get("name")
        if data.get("from") == "body" and isinstance(name, str) and not _is_pointer(name):
            message = f"with from: body, must be a JSON pointer such as /user, got {_brief(name)}"
            return [(("name",), message)]
        return []


def _is_pointer(text: str) -> bool:
    """A non-empty JSON pointer (RFC 6901): '/'-separated, '~' only as ~0 or ~1."""
    return text.startswith("/") and not re.search(r"~(?![01])", text)


class Variant(_Model):
    name: VariantName
    upstream: Upstream
    http2: Bool = False
    model: ModelName | None = None  # rewrites the JSON body's "model" for this upstream


class WeightedVariant(Variant):
    weight: Weight


class Step(_Model):
    weight: Weight
    hold: Duration


# DESIGN 2's ramp: 1 % for 5m, 5 % for 15m, 25 % for 30m, 100 % for 10m, then promote
DEFAULT_STEPS = (
    Step(weight=0.01, hold=300.0),
    Step(weight=0.05, hold=900.0),
    Step(weight=0.25, hold=1800.0),
    Step(weight=1.0, hold=600.0),
)


class StepSchedule(_Model):
    kind: Literal["step"] = "step"
    steps: list[Step] = Field(default_factory=lambda: list(DEFAULT_STEPS), min_length=1)

    @classmethod
    def _problems(cls, data: Mapping[Any, Any]) -> list[Problem]:
        weights = [_unit(_get(step, "weight")) for step in _items(data.get("steps"))]
        problems: list[Problem] = []
        for i in range(1, len(weights)):
            prev, weight = weights[i - 1], weights[i]
            if prev is not None and weight is not None and weight < prev:
                message = (
                    f"must not decrease along the ramp ({weight} < steps[{i - 1}].weight {prev})"
                )
                problems.append((("steps", i, "weight"), message))
        return problems


class ExponentialSchedule(_Model):
    kind: Literal["exponential"]
    p0: Number = Field(0.01, gt=0.0, le=1.0)
    rate: Rate = 0.1 / 3600  # lambda per second: 0.1/h
    hold_at_full: Duration = 600.0


def _schedule_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        kind = value.get("kind", "step")  # `kind: step` may be left out
        return kind if kind in ("step", "exponential") else None
    return getattr(value, "kind", "step")  # not a mapping: let StepSchedule say so


Schedule = Annotated[
    Annotated[StepSchedule, Tag("step")] | Annotated[ExponentialSchedule, Tag("exponential")],
    Discriminator(
        _schedule_kind,
        custom_error_type="schedule_kind",
        custom_error_message="must be 'step' or 'exponential'",
    ),
]


class Guard(_Model):
    errors: list[ErrorKind] = Field(
        default_factory=lambda: ["status_5xx", "timeout", "connect_error"], min_length=1
    )
    mode: Literal["absolute", "relative"] = Field(
        "absolute",
        description="absolute: test the canary's error rate against e0/e1. relative: test "
        "whether the canary fails `ratio` times as often as stable (each error of either arm is "
        "a trial on where it came from).",
    )
    e0: Probability = Field(0.01, description="Acceptable canary error rate (absolute mode).")
    e1: Probability = Field(0.05, description="Unacceptable canary error rate (absolute mode).")
    ratio: Annotated[Number, Field(gt=1.0)] = Field(
        2.0, description="Relative mode's H1: the canary's error rate is ratio x stable's (> 1)."
    )
    alpha: Probability = Field(
        0.01,
        description="P(any rollback during the whole rollout) for a canary that is fine: test i "
        "rolls back at llr >= A_i = ln(i (i + 1) / alpha), so the tests' shares sum to alpha.",
    )
    beta: Probability = Field(
        0.10, description="P(no rollback within a test) for a canary at e1, about (Wald)."
    )
    # Retired fields, declared only so that a document still carrying them gets a message that
    # says what replaced them (rather than "extra inputs are not permitted"); always rejected,
    # and absent from the published schema.
    epsilon: SkipJsonSchema[Any] = Field(None, exclude=True, repr=False)
    window: SkipJsonSchema[Any] = Field(None, exclude=True, repr=False)

    @classmethod
    def _problems(cls, data: Mapping[Any, Any]) -> list[Problem]:
        problems: list[Problem] = []
        for retired in ("epsilon", "window"):
            if retired in data:
                problems.append(
                    (
                        (retired,),
                        f"{retired} is no longer a guard field: relative mode tests whether the "
                        "canary's error rate is `ratio` times stable's (ratio > 1, default 2)",
                    )
                )
        e0, e1, alpha, beta = (cls._probability(data, k) for k in ("e0", "e1", "alpha", "beta"))
        if e0 is not None and e1 is not None and e1 <= e0:
            problems.append((("e1",), f"must be greater than e0 ({e1} <= {e0})"))
        if alpha is not None and beta is not None and alpha + beta >= 1:
            problems.append((("beta",), f"alpha + beta must be below 1 ({alpha} + {beta} >= 1)"))
        kinds = _items(data.get("errors"))
        latency = [k for k in kinds if isinstance(k, str) and k.startswith("latency_over:")]
        if len(latency) > 1:
            problems.append((("errors",), f"at most one latency_over:<ms>, got {latency}"))
        ttft = [k for k in kinds if isinstance(k, str) and k.startswith("ttft_over:")]
        if len(ttft) > 1:
            problems.append((("errors",), f"at most one ttft_over:<ms>, got {ttft}"))
        return problems

    @classmethod
    def _probability(cls, data: Mapping[Any, Any], key: str) -> float | None:
        value = _number(data[key]) if key in data else cls.model_fields[key].default
        return value if isinstance(value, float) and 0 < value < 1 else None

    @property
    def latency_threshold_ms(self) -> float | None:
        return self._threshold("latency_over:")

    @property
    def ttft_threshold_ms(self) -> float | None:
        return self._threshold("ttft_over:")

    def _threshold(self, prefix: str) -> float | None:
        for kind in self.errors:
            if kind.startswith(prefix):
                return float(kind.split(":", 1)[1])
        return None


def _one_or_many(value: object) -> object:
    # `metric: latency_ms` is a list of one; checked here so its error names `metric` itself
    return [_check_metric(value)] if isinstance(value, str) else value


def _unique_metrics(metrics: list[str]) -> list[str]:
    repeated = sorted({m for m in metrics if metrics.count(m) > 1})
    if repeated:
        raise ValueError(f"lists {', '.join(repeated)} more than once")
    return metrics


def _check_mde(value: object) -> object:
    def positive(x: object) -> float:
        number = _number(x)
        if isinstance(x, str) or number is None or number <= 0:
            raise ValueError(f"must be a positive number, got {_brief(x)}")
        return number

    if value is None or not isinstance(value, Mapping):
        return None if value is None else positive(value)
    return {str(k): positive(v) for k, v in value.items()}


ShadowMetrics = Annotated[
    list[ShadowMetric],
    BeforeValidator(_one_or_many),
    Field(min_length=1),
    AfterValidator(_unique_metrics),
]


class Shadow(Variant):
    sample: Weight = 1.0
    metric: ShadowMetrics = Field(default_factory=lambda: ["latency_ms"])  # a name or a list
    # the smallest mean difference worth finding (the mSPRT's mixing sd): one number for every
    # metric or {metric: number}; none: the sample sd of the first 100 differences
    mde: Annotated[float | dict[str, float] | None, BeforeValidator(_check_mde)] = None

    @classmethod
    def _problems(cls, data: Mapping[Any, Any]) -> list[Problem]:
        mde, metric = data.get("mde"), data.get("metric", "latency_ms")
        if not isinstance(mde, Mapping):
            return []
        metrics = [metric] if isinstance(metric, str) else _items(metric)
        return [
            (("mde", name), f"names no metric of this shadow (metrics: {metrics})")
            for name in mde
            if name not in metrics
        ]

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics compared, in declared order."""
        return tuple(self.metric)

    def mde_for(self, metric: str) -> float | None:
        return self.mde.get(metric) if isinstance(self.mde, dict) else self.mde


class Condition(_Model):
    header: str | None = Field(None, min_length=1)
    cookie: str | None = Field(None, min_length=1)
    query: str | None = Field(None, min_length=1)
    equals: str | None = None
    one_of: list[str] | None = Field(None, alias="in", min_length=1)
    unit_in: list[str] | None = Field(None, min_length=1)

    @classmethod
    def _problems(cls, data: Mapping[Any, Any]) -> list[Problem]:
        tests = [t for t in ("header", "cookie", "query", "unit_in") if data.get(t) is not None]
        values = [v for v in ("equals", "in", "one_of") if data.get(v) is not None]
        if len(tests) != 1:
            got = " and ".join(tests) or "none"
            return [((), f"needs exactly one of header, cookie, query or unit_in, got {got}")]
        if tests[0] == "unit_in" and values:
            return [((), "unit_in takes no equals or in")]
        if tests[0] != "unit_in" and len(values) != 1:
            return [((), f"{tests[0]} needs exactly one of equals or in")]
        return []


class Rule(_Model):
    when: Condition = Field(alias="if")
    then: str = Field(min_length=1)


class Flag(_Model):
    key: Key
    route: Route
    unit: UnitSource = Field(default_factory=UnitSource)
    salt: str | None = Field(None, min_length=1)
    assignment: Literal["buckets", "unleash"] = "buckets"
    stable: Variant
    canary: Variant | None = None
    variants: Annotated[list[WeightedVariant], BeforeValidator(_none_is_empty)] = Field(
        default_factory=list
    )
    schedule: Schedule = Field(default_factory=StepSchedule)
    advance_requires_evidence: Bool = True
    guard: Guard = Field(default_factory=Guard)
    on_canary_error: Literal["pass", "fallback"] = "pass"
    shadows: Annotated[list[Shadow], BeforeValidator(_none_is_empty)] = Field(default_factory=list)
    mirror_methods: Methods = Field(default_factory=lambda: ["GET", "POST"])
    rules: Annotated[list[Rule], BeforeValidator(_none_is_empty)] = Field(default_factory=list)

    @classmethod
    def _problems(cls, data: Mapping[Any, Any]) -> list[Problem]:
        return [*_name_problems(data), *_rule_problems(data), *_weight_problems(data)]

    @property
    def bucket_salt(self) -> str:
        return self.salt if self.salt is not None else self.key

    def arm_names(self) -> list[str]:
        """Every variant that can serve traffic: stable, canary, then the fixed arms."""
        return _arm_names({"stable": self.stable, "canary": self.canary, "variants": self.variants})


class FlagSet(_Model):
    """A validated set of flags, in declared order (built by `parse_flag_set`)."""

    flags: tuple[Flag, ...] = ()

    def get(self, key: str) -> Flag | None:
        return next((f for f in self.flags if f.key == key), None)


# --- rules across fields, on raw input ----------------------------------------------------------


def _get(item: object, key: str) -> object:
    if isinstance(item, Mapping):
        return item.get(key)
    return getattr(item, key, None) if isinstance(item, BaseModel) else None


def _items(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _number(value: object) -> float | None:
    """`value` as a number, or None if it is not one (strings are not) or is not finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _unit(value: object) -> float | None:
    number = _number(value)
    return number if number is not None and 0 <= number <= 1 else None


def _arm_entries(data: Mapping[Any, Any]) -> list[tuple[Loc, object]]:
    """(location, raw name) of stable, canary and each fixed arm."""
    entries: list[tuple[Loc, object]] = [(("stable", "name"), _get(data.get("stable"), "name"))]
    if data.get("canary") is not None:
        entries.append((("canary", "name"), _get(data["canary"], "name")))
    for i, variant in enumerate(_items(data.get("variants"))):
        entries.append((("variants", i, "name"), _get(variant, "name")))
    return entries


def _name_problems(data: Mapping[Any, Any]) -> list[Problem]:
    shadows = _items(data.get("shadows"))
    named = [
        *_arm_entries(data),
        *((("shadows", i, "name"), _get(s, "name")) for i, s in enumerate(shadows)),
    ]
    seen: dict[str, Loc] = {}
    problems: list[Problem] = []
    for loc, name in named:
        if not isinstance(name, str):
            continue
        if name in ROLES and loc[0] != name:
            problems.append((loc, f"{name!r} is reserved: rules use it to name the {name} role"))
        elif name in seen:
            also = _dotted(seen[name])
            problems.append((loc, f"duplicate variant name {_brief(name)} (also {also})"))
        else:
            seen[name] = loc
    return problems


def _rule_problems(data: Mapping[Any, Any]) -> list[Problem]:
    names = [name for _, name in _arm_entries(data)]
    variants = data.get("variants")
    if not all(isinstance(n, str) for n in names) or not isinstance(variants, list | tuple | None):
        return []  # an arm is broken and reported already: its name is not known
    known = sorted({*ROLES, *(str(n) for n in names)})
    problems: list[Problem] = []
    for i, rule in enumerate(_items(data.get("rules"))):
        then = _get(rule, "then")
        if then == "canary" and data.get("canary") is None:
            problems.append(
                (("rules", i, "then"), "names the canary role, but the flag has no canary")
            )
        elif isinstance(then, str) and then and then not in known:
            problems.append(
                (("rules", i, "then"), f"names unknown variant {_brief(then)}; known: {known}")
            )
    return problems


def _weight_problems(data: Mapping[Any, Any]) -> list[Problem]:
    weights = [_unit(_get(v, "weight")) for v in _items(data.get("variants"))]
    total = sum(w for w in weights if w is not None)
    if total > 1.0 + 1e-9:
        return [(("variants",), f"fixed-arm weights sum to {total:g}, more than 1")]
    return []


def _arm_names(data: Mapping[str, Any]) -> list[str]:
    names = []
    if data.get("stable") is not None:
        names.append(data["stable"].name)
    if data.get("canary") is not None:
        names.append(data["canary"].name)
    names.extend(v.name for v in data.get("variants") or [])
    return names


def _validation_error(
    title: str, errors: list[ErrorDetails], problems: list[Problem]
) -> ValidationError:
    """pydantic's own errors plus ours, as one ValidationError (locations kept as they are)."""
    details = [_detail(e["type"], e["loc"], e["msg"], e["input"]) for e in errors]
    details += [_detail("cross_field", loc, message, None) for loc, message in problems]
    return ValidationError.from_exception_data(title, details)


def _detail(kind: str, loc: Loc, message: str, value: object) -> InitErrorDetails:
    # "{message}" and a context, so braces in the message are never read as a template
    error = PydanticCustomError(kind, "{message}", {"message": message})
    return InitErrorDetails(type=error, loc=loc, input=value)


# --- parsing entry points -----------------------------------------------------------------------

_FLAG = TypeAdapter(Flag)
_ROUTE = TypeAdapter(Route)


def parse_flag(doc: object, *, path: str = "") -> Flag:
    """One flag document, or `InvalidDocument` with every problem under `path`."""
    try:
        return _FLAG.validate_python(doc)
    except ValidationError as exc:
        raise InvalidDocument(_field_errors(exc, path)) from None


def parse_flag_json(text: str | bytes, *, path: str = "") -> Flag:
    """A flag sent as JSON (the admin API's PUT body): parsed exactly like the YAML form."""
    return parse_flag(load_json(text), path=path)


def parse_flag_set(doc: object) -> FlagSet:
    """`{flags: [...]}` into a `FlagSet`, or `InvalidDocument` listing every problem."""
    if doc is None:
        doc = {"flags": []}  # an empty file
    if not isinstance(doc, Mapping):
        message = f"must be a mapping with a 'flags' list, got {_describe(doc)}"
        raise InvalidDocument([FieldError("$", message)])
    errors = [_unknown_key(k) for k in doc if k != "flags"]
    raw = doc.get("flags")
    raw = [] if raw is None else raw
    if not isinstance(raw, list | tuple):
        raise InvalidDocument(
            [*errors, FieldError("flags", f"must be a list of flags, got {_describe(raw)}")]
        )
    flags: list[Flag] = []
    for i, item in enumerate(raw):
        try:
            flags.append(parse_flag(item, path=f"flags[{i}]"))
        except InvalidDocument as exc:
            errors.extend(exc.errors)
    errors.extend(_duplicate_keys(raw))
    errors.extend(_overlaps(_routes(raw)))
    if errors:
        raise InvalidDocument(errors)
    return FlagSet(flags=tuple(flags))


def _duplicate_keys(raw: list[Any] | tuple[Any, ...]) -> list[FieldError]:
    first: dict[str, int] = {}
    errors = []
    for i, item in enumerate(raw):
        key = item.get("key") if isinstance(item, Mapping) else None
        if not isinstance(key, str):
            continue
        if key in first:
            errors.append(
                FieldError(
                    f"flags[{i}].key", f"duplicate flag key {_brief(key)} (flags[{first[key]}])"
                )
            )
        else:
            first[key] = i
    return errors


def _routes(raw: list[Any] | tuple[Any, ...]) -> list[tuple[int, str, Route]]:
    """(index, name, route) of every flag whose route is valid, whatever else is wrong with it."""
    routes = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            continue
        try:
            route = _ROUTE.validate_python(item.get("route"))
        except ValidationError:
            continue  # reported by parse_flag
        key = item.get("key")
        routes.append((i, key if isinstance(key, str) else f"flags[{i}]", route))
    return routes


def routes_overlap(a: Route, b: Route) -> bool:
    """Two routes could both claim one request at the same prefix length."""
    if a.path_prefix.rstrip("/") != b.path_prefix.rstrip("/"):
        return False
    if a.host is not None and b.host is not None and a.host != b.host:
        return False
    if a.model is not None and b.model is not None and not set(a.model) & set(b.model):
        return False  # one path, different models: the body's "model" tells them apart
    return not (
        a.methods is not None and b.methods is not None and not set(a.methods) & set(b.methods)
    )


def route_overlaps(indexed: list[tuple[int, Flag]]) -> list[FieldError]:
    """Every flag whose route overlaps an earlier one's, addressed by its index in the file."""
    return _overlaps([(i, flag.key, flag.route) for i, flag in indexed])


def _overlaps(routes: list[tuple[int, str, Route]]) -> list[FieldError]:
    errors = []
    for j, (index, _, later) in enumerate(routes):
        for _, name, earlier in routes[:j]:
            if routes_overlap(earlier, later):
                errors.append(
                    FieldError(
                        f"flags[{index}].route",
                        f"overlaps the route of flag {_brief(name)} "
                        f"(path_prefix {_brief(later.path_prefix)})",
                    )
                )
    return errors


# --- pydantic errors as operator messages -------------------------------------------------------

_TAGS = {"step", "exponential"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _field_errors(exc: ValidationError, prefix: str) -> list[FieldError]:
    out = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        # a key that is not a string is reported on the mapping that holds it
        path = _path(prefix, loc[:-1] if err["type"] == "invalid_key" else loc)
        if err["type"] == "schedule_kind":
            path += ".kind"
        out.append(FieldError(path or "$", _message(err)))
    return out


def _path(prefix: str, loc: Loc) -> str:
    path = prefix
    for i, part in enumerate(loc):
        if part in _TAGS and i > 0 and loc[i - 1] == "schedule":
            continue  # the discriminator's tag, not a key the user wrote
        if isinstance(part, int):
            path += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part):
            path += f".{part}" if path else part
        else:
            path += f"[{json.dumps(part)}]"  # a key such as "in space" or "" stays readable
    return path


def _unknown_key(key: object) -> FieldError:
    if isinstance(key, str):
        return FieldError(_path("", (key,)), "unknown field")
    return FieldError("$", f"keys must be strings, got {_brief(key)}")  # YAML's `1:`, `null:`


def _message(err: ErrorDetails) -> str:
    kind, value = err["type"], err["input"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping, got {_describe(value)}"
    if kind == "list_type":
        return f"must be a list, got {_describe(value)}"
    if kind == "string_type":
        return f"must be a string, got {_describe(value)}"
    if kind == "invalid_key":
        return f"keys must be strings, got {_brief(value)}"
    if kind == "schedule_kind":
        return f"must be 'step' or 'exponential', got {_brief(_get(value, 'kind'))}"
    message = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return message.replace(" after validation", "") or kind


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for kinds, name in ((int | float, "a number"), (str, "a string"), (Mapping, "a mapping")):
        if isinstance(value, kinds):
            return name
    return "a list" if isinstance(value, list | tuple) else type(value).__name__


def _dotted(loc: Loc) -> str:
    return _path("", loc)
