"""Assignment (DESIGN 3): golden hashes, monotone ramps, uniformity, rules, on_missing, Unleash."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from itertools import accumulate
from pathlib import Path
from typing import Any

import mmh3
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import chi2_contingency, chisquare

from gateway.core.assignment import (
    BUCKETS,
    COOKIE_NAME,
    VARIANT_SEED,
    Assigner,
    Assignment,
    Reason,
    Role,
    StaticFacts,
    bucket,
    canary_threshold,
    random_unit,
    thresholds,
    unleash_normalized,
    unleash_variant,
    variant_bucket,
)
from gateway.core.flags import parse_flag

VECTORS = json.loads(
    (Path(__file__).parents[1] / "spec" / "gateway-buckets.json").read_text(encoding="utf-8")
)["vectors"]
NO_FACTS = StaticFacts()
UNITS = [f"user-{i}" for i in range(200_000)]


def make(**overrides: Any) -> Assigner:
    doc: dict[str, Any] = {
        "key": "sentiment",
        "route": {"path_prefix": "/v1/sentiment"},
        "stable": {"name": "v1", "upstream": "http://127.0.0.1:9001"},
        "canary": {"name": "v2", "upstream": "http://127.0.0.1:9002"},
    }
    doc.update(overrides)
    return Assigner(parse_flag(doc))


def arm(name: str, weight: float) -> dict[str, Any]:
    return {"name": name, "upstream": "http://127.0.0.1:9100", "weight": weight}


def never() -> float:
    raise AssertionError("the random source must not be used for requests that carry a unit")


def run(
    a: Assigner,
    unit: str | None,
    facts: StaticFacts = NO_FACTS,
    *,
    weight: float = 0.0,
    canary_open: bool = True,
) -> Assignment:
    return a.assign(unit, facts, weight=weight, canary_open=canary_open, rand=never)


# --- the formulas -----------------------------------------------------------------------------


def unsigned(salt: str, unit: str, seed: int) -> int:
    return mmh3.hash(f"{salt}:{unit}", seed=seed, signed=False)


def test_golden_vectors_are_unsigned_murmur3() -> None:
    assert len(VECTORS) >= 20
    for v in VECTORS:
        salt, unit = v["salt"], v["unit"]
        assert v["bucket"] == unsigned(salt, unit, 0) % 10000 == bucket(salt, unit)
        assert v["variant_bucket"] == unsigned(salt, unit, 86028157) % 10000
        assert v["variant_bucket"] == variant_bucket(salt, unit)
        assert v["unleash_normalized"] == unsigned(salt, unit, 0) % 100 + 1
        assert v["unleash_normalized"] == unleash_normalized(salt, unit)


def test_golden_vectors_would_catch_a_signed_hash() -> None:
    signed = [mmh3.hash(f"{v['salt']}:{v['unit']}", seed=0, signed=True) % 10000 for v in VECTORS]
    differ = sum(s != v["bucket"] for s, v in zip(signed, VECTORS, strict=True))
    assert differ >= 5, "the vectors must include units whose hash has the sign bit set"


def test_constants() -> None:
    assert BUCKETS == 10_000
    assert VARIANT_SEED == 86028157
    assert [canary_threshold(w) for w in (0.0, 0.0001, 0.01, 0.05, 0.29, 1.0)] == [
        0,
        1,
        100,
        500,
        2900,
        10000,
    ]


def test_buckets_are_uniform() -> None:
    groups = Counter(bucket("sentiment", u) // 100 for u in UNITS)
    assert len(groups) == 100
    assert chisquare([groups[g] for g in range(100)]).pvalue > 0.001


def test_canary_membership_is_independent_of_the_variant_hash() -> None:
    table = [[0] * 10 for _ in range(2)]
    cut = canary_threshold(0.3)
    for u in UNITS[:100_000]:
        table[bucket("sentiment", u) < cut][variant_bucket("sentiment", u) // 1000] += 1
    assert chi2_contingency(table).pvalue > 0.001


@given(
    units=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=50),
    w1=st.floats(0, 1),
    w2=st.floats(0, 1),
)
def test_raising_the_weight_only_adds_canary_units(units: list[str], w1: float, w2: float) -> None:
    low, high = sorted((w1, w2))
    a = make()
    at_low = {u for u in units if run(a, u, weight=low).role == Role.CANARY}
    at_high = {u for u in units if run(a, u, weight=high).role == Role.CANARY}
    assert at_low <= at_high


def test_canary_share_follows_the_weight() -> None:
    a = make()
    for weight in (0.0, 0.01, 0.25, 1.0):
        share = sum(run(a, u, weight=weight).role == Role.CANARY for u in UNITS[:40_000]) / 40_000
        assert share == pytest.approx(weight, abs=0.006)


def test_canary_iff_bucket_below_threshold() -> None:
    a = make()
    for u in UNITS[:2000]:
        got = run(a, u, weight=0.37)
        assert got.bucket == bucket("sentiment", u)
        assert (got.role == Role.CANARY) == (got.bucket < 3700)
        assert got.reason == (Reason.CANARY if got.bucket < 3700 else Reason.STABLE)


def test_salt_defaults_to_the_key_and_can_be_set() -> None:
    assert run(make(), "alice").bucket == bucket("sentiment", "alice")
    assert run(make(salt="other"), "alice").bucket == bucket("other", "alice")


def test_no_canary_and_rolled_back_canary_take_no_traffic() -> None:
    without = make(canary=None)
    closed = make()
    for u in UNITS[:2000]:
        assert run(without, u, weight=1.0).variant == "v1"
        assert run(closed, u, weight=1.0, canary_open=False).variant == "v1"


# --- fixed arms -------------------------------------------------------------------------------


def test_cumulative_thresholds_give_each_arm_its_share_of_the_10000_buckets() -> None:
    assert thresholds([0.2, 0.3], BUCKETS) == (2000, 5000)
    # Rounding the running sum: three thirds cover all buckets with no gap or overlap.
    assert thresholds([1 / 3, 1 / 3, 1 / 3], BUCKETS) == (3333, 6667, 10000)
    assert thresholds([0.1, 0.2, 0.7], BUCKETS)[-1] == BUCKETS
    assert thresholds([0.00004, 0.00004], BUCKETS) == (0, 1)


def test_variant_shares_match_the_declared_weights() -> None:
    a = make(variants=[arm("v3", 0.2), arm("v4", 0.3)])
    counts = Counter(run(a, u).variant for u in UNITS[:100_000])
    assert counts["v2"] == 0
    for name, weight in (("v3", 0.2), ("v4", 0.3), ("v1", 0.5)):
        assert counts[name] / 100_000 == pytest.approx(weight, abs=0.006)


def test_variant_choice_is_the_variant_hash_over_cumulative_cuts() -> None:
    a = make(variants=[arm("v3", 0.2), arm("v4", 0.3)])
    for u in UNITS[:3000]:
        got = run(a, u, weight=0.1)
        if got.role == Role.CANARY:
            continue
        vb = variant_bucket("sentiment", u)
        expected = "v3" if vb < 2000 else "v4" if vb < 5000 else "v1"
        assert got.variant == expected
        assert got.reason == (Reason.STABLE if expected == "v1" else Reason.VARIANT)
        assert got.role == (Role.STABLE if expected == "v1" else Role.VARIANT)


def test_a_canary_ramp_never_reshuffles_the_other_arms() -> None:
    a = make(variants=[arm("v3", 0.25), arm("v4", 0.25)])
    before = {u: run(a, u, weight=0.01) for u in UNITS[:20_000]}
    for weight, canary_open in ((0.05, True), (0.5, True), (0.5, False)):
        for u, old in before.items():
            new = run(a, u, weight=weight, canary_open=canary_open)
            if old.role != Role.CANARY and new.role != Role.CANARY:
                assert new.variant == old.variant, (u, weight)


def test_arms_can_take_every_non_canary_unit() -> None:
    a = make(variants=[arm("v3", 0.5), arm("v4", 0.5)])
    assert {run(a, u).variant for u in UNITS[:5000]} == {"v3", "v4"}


# --- rules ------------------------------------------------------------------------------------

RULES = [
    {"if": {"header": "X-Canary", "equals": "always"}, "then": "canary"},
    {"if": {"header": "x-canary", "equals": "never"}, "then": "stable"},
    {"if": {"unit_in": ["alice", "bob"]}, "then": "v3"},
    {"if": {"cookie": "beta", "in": ["yes", "1"]}, "then": "v2"},
    {"if": {"query": "model", "equals": "v1"}, "then": "v1"},
]


@pytest.mark.parametrize(
    ("unit", "facts", "expected"),
    [
        ("carol", StaticFacts(headers={"x-canary": "always"}), ("v2", Role.CANARY)),
        ("carol", StaticFacts(headers={"X-CANARY": "never"}), ("v1", Role.STABLE)),
        ("alice", NO_FACTS, ("v3", Role.VARIANT)),
        # First match wins: alice's unit rule is below the header rule.
        ("alice", StaticFacts(headers={"x-canary": "always"}), ("v2", Role.CANARY)),
        ("carol", StaticFacts(cookies={"beta": "1"}), ("v2", Role.CANARY)),
        ("carol", StaticFacts(params={"model": "v1"}), ("v1", Role.STABLE)),
        (None, StaticFacts(headers={"x-canary": "always"}), ("v2", Role.CANARY)),
    ],
)
def test_rules_first_match_with_role_words_and_variant_names(
    unit: str | None, facts: StaticFacts, expected: tuple[str, Role]
) -> None:
    a = make(variants=[arm("v3", 0.1)], rules=RULES)
    got = run(a, unit, facts, weight=1.0)
    assert (got.variant, got.role, got.reason) == (*expected, Reason.RULE)
    assert got.bucket == (bucket("sentiment", unit) if unit else None)


def test_unmatched_rules_fall_back_to_the_hash() -> None:
    a = make(variants=[arm("v3", 0.1)], rules=RULES)
    got = run(a, "carol", StaticFacts(headers={"x-canary": "sometimes"}), weight=0.0)
    assert got.reason in (Reason.STABLE, Reason.VARIANT)


@pytest.mark.parametrize("then", ["canary", "v2"])
def test_a_rule_never_sends_traffic_to_a_rolled_back_canary(then: str) -> None:
    a = make(rules=[{"if": {"header": "x-canary", "equals": "always"}, "then": then}])
    facts = StaticFacts(headers={"x-canary": "always"})
    for u in UNITS[:500]:
        got = run(a, u, facts, weight=1.0, canary_open=False)
        assert (got.variant, got.reason) == ("v1", Reason.STABLE)
    assert run(a, None, facts, canary_open=False).reason == Reason.MISSING_UNIT
    assert run(a, "x", facts, canary_open=True).reason == Reason.RULE


def test_a_rolled_back_canary_rule_still_wins_first_match_then_the_hash_decides() -> None:
    # DESIGN 3 / the brief: the matching canary rule does not hand over to later rules; the
    # request is assigned as if no rule had matched, without the canary.
    a = make(
        variants=[arm("v3", 0.1)],
        rules=[
            {"if": {"header": "x-canary", "equals": "always"}, "then": "canary"},
            {"if": {"unit_in": UNITS[:300]}, "then": "v3"},
        ],
    )
    facts = StaticFacts(headers={"x-canary": "always"})
    got = [run(a, u, facts, weight=1.0, canary_open=False) for u in UNITS[:300]]
    assert {g.reason for g in got} == {Reason.STABLE, Reason.VARIANT}
    assert all(g.variant != "v2" for g in got)


def test_without_a_canary_no_mode_picks_one() -> None:
    for mode in ("buckets", "unleash"):
        a = make(canary=None, assignment=mode)
        assert {run(a, u, weight=1.0).variant for u in UNITS[:500]} == {"v1"}


def test_a_canary_rule_applies_at_weight_zero_while_the_canary_is_open() -> None:
    a = make(rules=[{"if": {"unit_in": ["tester"]}, "then": "canary"}])
    assert run(a, "tester", weight=0.0).variant == "v2"


# --- the unit and on_missing ------------------------------------------------------------------


def test_unit_from_reads_the_flags_unit_source() -> None:
    by_header = make(unit={"from": "header", "name": "X-User-Id"})
    assert by_header.unit_from(StaticFacts(headers={"x-user-id": "alice"})) == "alice"
    assert by_header.unit_from(StaticFacts(headers={"x-user-id": ""})) is None
    assert by_header.unit_from(NO_FACTS) is None
    by_cookie = make(unit={"from": "cookie", "name": "uid"})
    assert by_cookie.unit_from(StaticFacts(cookies={"uid": "bob"})) == "bob"
    by_query = make(unit={"from": "query", "name": "user"})
    assert by_query.unit_from(StaticFacts(params={"user": "carol"})) == "carol"


def test_on_missing_stable_sends_unit_less_requests_to_stable() -> None:
    a = make()
    for unit in (None, ""):
        got = run(a, unit, weight=1.0)
        assert got == Assignment("v1", Role.STABLE, None, Reason.MISSING_UNIT, None)


def test_on_missing_random_draws_a_unit_per_request() -> None:
    a = make(unit={"on_missing": "random"})
    rng = random.Random(7)
    results = [
        a.assign(None, NO_FACTS, weight=0.5, canary_open=True, rand=rng.random) for _ in range(2000)
    ]
    again = random.Random(7)
    first = a.assign(None, NO_FACTS, weight=0.5, canary_open=True, rand=again.random)
    assert first == results[0]  # the caller's random source decides, nothing else
    assert len({r.unit for r in results}) == 2000
    assert all(r.issue_cookie is None for r in results)
    for r in results:
        assert r.unit is not None
        assert r.bucket == bucket("sentiment", r.unit)
    share = sum(r.role == Role.CANARY for r in results) / len(results)
    assert share == pytest.approx(0.5, abs=0.05)


def test_on_missing_cookie_issues_gw_uid_and_then_sticks_to_it() -> None:
    a = make(unit={"on_missing": "cookie"})
    rng = random.Random(3)
    first = a.assign(None, NO_FACTS, weight=0.5, canary_open=True, rand=rng.random)
    assert first.issue_cookie is not None
    assert first.issue_cookie == first.unit
    assert len(first.issue_cookie) == 32
    int(first.issue_cookie, 16)
    assert first.bucket == bucket("sentiment", first.unit)
    later = StaticFacts(cookies={COOKIE_NAME: first.issue_cookie})
    unit = a.unit_from(later)
    assert unit == first.unit
    second = run(a, unit, later, weight=0.5)
    assert (second.variant, second.issue_cookie) == (first.variant, None)


def test_random_unit_is_32_hex_digits_from_the_callers_source() -> None:
    ids = {random_unit(random.Random(i).random) for i in range(1000)}
    assert len(ids) == 1000
    assert all(len(u) == 32 and int(u, 16) >= 0 for u in ids)
    assert random_unit(random.Random(1).random) == random_unit(random.Random(1).random)


# --- Unleash-compatible mode ------------------------------------------------------------------


def test_unleash_canary_iff_normalized_value_within_the_percentage() -> None:
    a = make(assignment="unleash", salt="AB12A")
    for weight in (0.0, 0.004, 0.1, 0.5, 0.55, 1.0):
        for u in UNITS[:1000]:
            n = mmh3.hash(f"AB12A:{u}", seed=0, signed=False) % 100 + 1
            got = run(a, u, weight=weight)
            assert got.bucket == n
            assert (got.role == Role.CANARY) == (weight > 0 and n <= round(weight * 100))


def unleash_reference(group: str, unit: str, weights: list[int]) -> int | None:
    """Unleash's selectVariantDefinition, transcribed: skip zero weights, counter >= target."""
    total = sum(weights)
    if total <= 0:
        return None
    target = mmh3.hash(f"{group}:{unit}", seed=86028157, signed=False) % total + 1
    counter = 0
    for index, weight in enumerate(weights):
        if weight == 0:
            continue
        counter += weight
        if counter >= target:
            return index
    return None


@pytest.mark.parametrize(
    "weights", [[1], [1, 1], [33, 33, 33], [0, 5, 0, 5], [1, 49, 50], [250] * 4]
)
def test_unleash_variant_matches_the_reference(weights: list[int]) -> None:
    cumulative = list(accumulate(weights))
    for u in UNITS[:2000]:
        assert unleash_variant("f", u, cumulative) == unleash_reference("f", u, weights)
    assert unleash_variant("f", "u", []) is None
    assert unleash_variant("f", "u", [0, 0]) is None


def test_unleash_mode_chooses_arms_by_unleash_over_1000() -> None:
    a = make(assignment="unleash", variants=[arm("v3", 0.2), arm("v4", 0.35)])
    names = ["v3", "v4", "v1"]
    for u in UNITS[:3000]:
        got = run(a, u, weight=0.0)
        index = unleash_reference("sentiment", u, [200, 350, 450])
        assert index is not None
        assert got.variant == names[index]
        assert got.reason == (Reason.STABLE if got.variant == "v1" else Reason.VARIANT)


def test_unleash_mode_without_arms_is_stable_or_canary() -> None:
    a = make(assignment="unleash")
    assert {run(a, u, weight=0.3).variant for u in UNITS[:500]} == {"v1", "v2"}


# --- the answer -------------------------------------------------------------------------------


def test_answers_are_frozen_and_print_their_values() -> None:
    got = run(make(), "alice", weight=1.0)
    assert got == Assignment(
        "v2", Role.CANARY, bucket("sentiment", "alice"), Reason.CANARY, "alice"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.variant = "v1"  # type: ignore[misc]
    assert f"{got.reason}/{got.role}" == "canary/canary"
    assert json.dumps([got.reason, got.role]) == '["canary", "canary"]'
