"""Who gets which model (DESIGN 3): buckets, rules and variant choice.

Owns the binding hash formulas, each one tiny pure function with its seed a named constant,
and `Assigner`: one flag version compiled into plain tuples so that the per-request call reads
no pydantic model and allocates nothing but its answer.

    bucket(unit)          = murmur3(f"{salt}:{unit}", seed 0)          % 10000   (canary)
    variant_bucket(unit)  = murmur3(f"{salt}:{unit}", seed 86028157)   % 10000   (fixed arms)
    canary                iff bucket < round(w * 10000)

The two hashes are independent, so ramping the canary never moves a non-canary unit to another
arm. `assignment: unleash` flags use Unleash's arithmetic instead (`% 100 + 1` for the rollout,
`% total + 1` over integer weights for variants) so that users land where Unleash put them.

The canary weight is an argument of `Assigner.assign`, not part of the compiled flag: the
controller moves it all the time and `round(w * 10000)` costs less than swapping assigners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Protocol

import mmh3

from gateway.core.flags import Condition, Flag

BUCKETS = 10_000
CANARY_SEED = 0
VARIANT_SEED = 86028157  # Unleash's variant seed, so both modes share one second hash
UNLEASH_PERCENT = 100  # Unleash's rollout resolution: percentages 1..100
UNLEASH_VARIANT_TOTAL = 1000  # Unleash spreads variant weights over 1000 (0.1 % steps)
COOKIE_NAME = "gw_uid"  # the cookie that carries a unit id the gateway issued (on_missing: cookie)

_UNIT_BITS = 128  # a random unit id is 32 hex characters
_FLOAT_BITS = 53  # random.random() returns k / 2**53: exactly 53 random bits per call


# The hash functions. mmh3's default is signed=True, which silently changes every bucket, so
# signed=False is spelt out; seed and signed are positional because this is the hot path and
# keyword arguments cost measurably more here (bench/RESULTS.md).


def bucket(salt: str, unit: str) -> int:
    """The unit's canary bucket, 0..9999: canary iff below `canary_threshold(w)`."""
    return mmh3.hash(f"{salt}:{unit}", CANARY_SEED, False) % BUCKETS


def variant_bucket(salt: str, unit: str) -> int:
    """The unit's fixed-arm bucket, 0..9999, independent of `bucket`."""
    return mmh3.hash(f"{salt}:{unit}", VARIANT_SEED, False) % BUCKETS


def canary_threshold(weight: float) -> int:
    """Buckets below this are canary at weight `weight` (0.01 % resolution)."""
    return round(weight * BUCKETS)


def unleash_normalized(salt: str, unit: str, *, normalizer: int = 100, seed: int = 0) -> int:
    """Unleash's `normalizedValue`: murmur3(f"{groupId}:{id}") % normalizer + 1."""
    return mmh3.hash(f"{salt}:{unit}", seed, False) % normalizer + 1


def unleash_percentage(weight: float) -> int:
    """The whole percentage an Unleash rollout of `weight` would carry."""
    return round(weight * UNLEASH_PERCENT)


def unleash_variant(salt: str, unit: str, cumulative: Sequence[int]) -> int | None:
    """Index of the variant Unleash picks, given cumulative integer weights in declared order.

    The first variant whose cumulative weight reaches `murmur3 % total + 1` (seed 86028157);
    zero-weight variants can never be first to reach it. None when the total weight is 0
    (Unleash's "disabled" variant).
    """
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    target = unleash_normalized(salt, unit, normalizer=total, seed=VARIANT_SEED)
    for index, reach in enumerate(cumulative):
        if reach >= target:
            return index
    return None  # unreachable: the last cumulative weight is the total


def thresholds(weights: Iterable[float], scale: int) -> tuple[int, ...]:
    """`round(cumulative weight * scale)` per arm, capped at `scale`.

    Rounding the running sum, not each weight, keeps every share within half a bucket of its
    weight and makes the thresholds end exactly at `scale` when the weights sum to 1.
    """
    out: list[int] = []
    cumulative = 0.0
    for weight in weights:
        cumulative += weight
        out.append(min(scale, round(cumulative * scale)))
    return tuple(out)


def random_unit(rand: Callable[[], float]) -> str:
    """A fresh unit id of 32 hex characters drawn from the caller's random source."""
    bits = 0
    for _ in range(-(-_UNIT_BITS // _FLOAT_BITS)):
        bits = (bits << _FLOAT_BITS) | int(rand() * (1 << _FLOAT_BITS))
    return f"{bits & ((1 << _UNIT_BITS) - 1):032x}"


class Reason(StrEnum):
    """Why a request went where it went (a StrEnum so that f-strings print the value)."""

    RULE = "rule"
    CANARY = "canary"
    VARIANT = "variant"
    STABLE = "stable"
    MISSING_UNIT = "missing-unit"


class Role(StrEnum):
    """Which kind of arm served: the values of `Assignment.role`."""

    STABLE = "stable"
    CANARY = "canary"
    VARIANT = "variant"


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where one request goes and why.

    `bucket` is the unit's canary position whenever there is a unit: `bucket()` (0..9999) in
    buckets mode, Unleash's normalized value (1..100) in unleash mode; None without a unit.
    `issue_cookie` is the unit id the caller must set as cookie `gw_uid` (on_missing: cookie).
    """

    variant: str
    role: str
    bucket: int | None
    reason: Reason
    unit: str | None
    issue_cookie: str | None = None


# A frozen dataclass's __init__ goes through object.__setattr__ once per field, the largest item
# of a request's assignment. The request path fills the slots through their own descriptors
# instead (about half the time, bench/RESULTS.md); the object is the same, and as frozen.
_SLOT_SETTERS = tuple(Assignment.__dict__[f.name].__set__ for f in fields(Assignment))


def _answer(
    variant: str, role: str, bucket: int | None, reason: Reason, unit: str | None, issue: str | None
) -> Assignment:
    out = object.__new__(Assignment)
    set_variant, set_role, set_bucket, set_reason, set_unit, set_issue = _SLOT_SETTERS
    set_variant(out, variant)
    set_role(out, role)
    set_bucket(out, bucket)
    set_reason(out, reason)
    set_unit(out, unit)
    set_issue(out, issue)
    return out


class RequestFacts(Protocol):
    """What rules and the unit source may read from a request; None when absent."""

    def header(self, name: str) -> str | None:
        """The header's value; `name` is lower-case."""

    def cookie(self, name: str) -> str | None: ...

    def query(self, name: str) -> str | None: ...

    def body(self, pointer: str) -> str | None:
        """The unit id at a JSON pointer into the request body (`unit.from: body`)."""


@dataclass(frozen=True, slots=True)
class StaticFacts:
    """`RequestFacts` from plain dicts, for the CLI and tests; header names are lower-cased."""

    headers: Mapping[str, str] = field(default_factory=dict)
    cookies: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    units: Mapping[str, str] = field(default_factory=dict)  # JSON pointer -> value in the body

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", {k.lower(): v for k, v in self.headers.items()})

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def cookie(self, name: str) -> str | None:
        return self.cookies.get(name)

    def query(self, name: str) -> str | None:
        return self.params.get(name)

    def body(self, pointer: str) -> str | None:
        return self.units.get(pointer)


@dataclass(frozen=True, slots=True)
class _Arm:
    name: str
    role: Role


# A compiled rule: (source, name, accepted values, arm). Source "unit" tests the unit id;
# otherwise it is the RequestFacts method to call with `name`.
_CompiledRule = tuple[str, str, frozenset[str], _Arm]


class Assigner:
    """One flag version, compiled for the request path.

    Build one per flag version (not per request). `assign` is pure: the same unit, facts,
    weight and canary state always give the same answer; `rand` is called only for unit-less
    requests of flags with `on_missing: random | cookie`.
    """

    __slots__ = (
        "_canary",
        "_cookie_fallback",
        "_decide",
        "_missing",
        "_rules",
        "_stable",
        "_unit_name",
        "_unit_source",
        "_variant_arms",
        "_variant_cuts",
        "_variant_table",
        "key",
        "mode",
        "on_missing",
        "salt",
    )

    def __init__(self, flag: Flag) -> None:
        self.key = flag.key
        self.salt = flag.bucket_salt
        self.mode = flag.assignment
        self.on_missing = flag.unit.on_missing
        self._unit_source = flag.unit.source
        name = flag.unit.name
        self._unit_name = name.lower() if flag.unit.source == "header" else name
        self._cookie_fallback = flag.unit.on_missing == "cookie"
        self._stable = _Arm(flag.stable.name, Role.STABLE)
        self._canary = _Arm(flag.canary.name, Role.CANARY) if flag.canary else None
        self._missing = Assignment(self._stable.name, Role.STABLE, None, Reason.MISSING_UNIT, None)
        self._rules = tuple(
            _compile_rule(rule.when, self._arm_for(rule.then, flag)) for rule in flag.rules
        )
        self._compile_arms(flag)

    def _compile_arms(self, flag: Flag) -> None:
        arms = tuple(_Arm(v.name, Role.VARIANT) for v in flag.variants)
        weights = [v.weight for v in flag.variants]
        if self.mode == "unleash" and arms:
            # Stable is the last arm and takes what is left of Unleash's 1000, so the
            # normalizer is 1000, as in Unleash, whenever the weights sum to at most 1.
            self._variant_arms = (*arms, self._stable)
            self._variant_cuts = thresholds([*weights, 1.0], UNLEASH_VARIANT_TOTAL)
        else:
            self._variant_arms = arms
            self._variant_cuts = thresholds(weights, BUCKETS)
        self._variant_table = tuple(zip(self._variant_arms, self._variant_cuts, strict=True))
        self._decide = self._unleash if self.mode == "unleash" else self._buckets

    def unit_from(self, facts: RequestFacts) -> str | None:
        """The request's unit id from the flag's unit source; empty counts as missing.

        With `on_missing: cookie`, a request without it is identified by the `gw_uid` cookie
        issued earlier, which is what keeps such visitors sticky.
        """
        value = getattr(facts, self._unit_source)(self._unit_name)
        if not value and self._cookie_fallback:
            value = facts.cookie(COOKIE_NAME)
        return value or None

    def assign(
        self,
        unit: str | None,
        facts: RequestFacts,
        *,
        weight: float,
        canary_open: bool,
        rand: Callable[[], float],
    ) -> Assignment:
        """Rules first (first match wins), then the unit's hash.

        `weight` is the canary weight now; `canary_open=False` means the canary is rolled
        back: nothing, not even a rule, sends traffic to it.
        """
        issue = None
        if not unit:
            unit = None
            if self.on_missing != "stable":
                unit = random_unit(rand)
                issue = unit if self.on_missing == "cookie" else None
        if not canary_open:
            weight = 0.0
        for source, name, values, arm in self._rules:
            value = unit if source == "unit" else getattr(facts, source)(name)
            if value is not None and value in values:
                if arm is self._canary and not canary_open:
                    break  # first match wins, but its target is rolled back: hash as if unmatched
                return _answer(arm.name, arm.role, self._position(unit), Reason.RULE, unit, issue)
        if unit is None:
            return self._missing
        return self._decide(unit, weight, issue)

    def _buckets(self, unit: str, weight: float, issue: str | None) -> Assignment:
        b = bucket(self.salt, unit)
        canary = self._canary
        if canary is not None and b < canary_threshold(weight):
            return _answer(canary.name, Role.CANARY, b, Reason.CANARY, unit, issue)
        if self._variant_table:
            vb = variant_bucket(self.salt, unit)
            for arm, cut in self._variant_table:
                if vb < cut:
                    return _answer(arm.name, arm.role, b, Reason.VARIANT, unit, issue)
        return _answer(self._stable.name, Role.STABLE, b, Reason.STABLE, unit, issue)

    def _unleash(self, unit: str, weight: float, issue: str | None) -> Assignment:
        n = unleash_normalized(self.salt, unit)
        canary = self._canary
        if canary is not None and weight > 0 and n <= unleash_percentage(weight):
            return _answer(canary.name, Role.CANARY, n, Reason.CANARY, unit, issue)
        index = unleash_variant(self.salt, unit, self._variant_cuts)
        arm = self._stable if index is None else self._variant_arms[index]
        reason = Reason.STABLE if arm is self._stable else Reason.VARIANT
        return _answer(arm.name, arm.role, n, reason, unit, issue)

    def _position(self, unit: str | None) -> int | None:
        if unit is None:
            return None
        return (
            unleash_normalized(self.salt, unit)
            if self.mode == "unleash"
            else bucket(self.salt, unit)
        )

    def _arm_for(self, then: str, flag: Flag) -> _Arm:
        # Role words win over a variant that happens to be called "stable" or "canary".
        if then == Role.STABLE or then == self._stable.name:
            return self._stable
        if self._canary is not None and then in (Role.CANARY, self._canary.name):
            return self._canary
        if then in {v.name for v in flag.variants}:
            return _Arm(then, Role.VARIANT)
        raise ValueError(f"flag {flag.key!r}: rule target {then!r} names no arm")


def _compile_rule(when: Condition, arm: _Arm) -> _CompiledRule:
    if when.unit_in is not None:
        return ("unit", "", frozenset(when.unit_in), arm)
    values = frozenset(when.one_of if when.one_of is not None else [when.equals or ""])
    if when.header:
        return ("header", when.header.lower(), values, arm)
    if when.cookie:
        return ("cookie", when.cookie, values, arm)
    assert when.query  # Condition's validator guarantees exactly one source
    return ("query", when.query, values, arm)
