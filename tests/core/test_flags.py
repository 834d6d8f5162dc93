"""The flag document (DESIGN 2): defaults, every rejection with its path, and fuzzing."""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.core.documents import load_yaml
from gateway.core.flags import (
    DEFAULT_STEPS,
    KEY_PATTERN,
    Condition,
    ExponentialSchedule,
    FlagSet,
    Guard,
    Route,
    StepSchedule,
    parse_flag,
    parse_flag_json,
    parse_flag_set,
    route_overlaps,
    routes_overlap,
)
from gateway.errors import FieldError, InvalidDocument

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "flags.yaml"

Doc = dict[str, Any]


def minimal(key: str = "sentiment", prefix: str = "/v1/sentiment") -> Doc:
    return {
        "key": key,
        "route": {"path_prefix": prefix},
        "stable": {"name": "v1", "upstream": "http://127.0.0.1:9001"},
    }


def full() -> Doc:
    """Every section DESIGN 2 shows, all valid."""
    return {
        **minimal(),
        "unit": {"from": "header", "name": "x-user-id", "on_missing": "stable"},
        "salt": "sentiment",
        "canary": {"name": "v2", "upstream": "http://127.0.0.1:9002"},
        "variants": [{"name": "v4", "upstream": "http://127.0.0.1:9004", "weight": 0.2}],
        "schedule": {
            "kind": "step",
            "steps": [{"weight": 0.01, "hold": "5m"}, {"weight": 1.0, "hold": "10m"}],
        },
        "advance_requires_evidence": True,
        "guard": {"errors": ["status_5xx"], "e0": 0.01, "e1": 0.05, "alpha": 0.01, "beta": 0.1},
        "on_canary_error": "pass",
        "shadows": [{"name": "v3", "upstream": "http://127.0.0.1:9003", "sample": 0.1}],
        "rules": [
            {"if": {"header": "x-canary", "equals": "always"}, "then": "canary"},
            {"if": {"unit_in": ["alice", "bob"]}, "then": "stable"},
        ],
    }


def errors_of(doc: object) -> list[FieldError]:
    with pytest.raises(InvalidDocument) as caught:
        parse_flag_set(doc)
    assert caught.value.errors, "InvalidDocument without errors"
    return caught.value.errors


DROP = object()


def set_at(doc: Any, path: str, value: Any) -> Any:
    """`doc` with `value` at a dotted path such as `guard.e0` or `rules.0.if`; DROP removes."""
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for part in parents:
        node = node[part]
    if value is DROP:
        del node[last]
    else:
        node[last] = value
    return doc


def flag_with(*changes: tuple[str, Any]) -> Doc:
    doc = full()
    for path, value in changes:
        set_at(doc, path, value)
    return {"flags": [doc]}


def two_flags(second: Doc) -> Doc:
    return {"flags": [full(), second]}


# --- one invalid document at a time --------------------------------------------------------------

# (id, document, path that must be reported, words the message must contain)
INVALID: list[tuple[str, object, str, str]] = [
    ("unknown field", flag_with(("colour", "red")), "flags[0].colour", "unknown field"),
    ("unknown nested", flag_with(("guard.zeta", 1)), "flags[0].guard.zeta", "unknown field"),
    ("unknown top-level", {"flags": [], "flgs": []}, "flgs", "unknown field"),
    ("route not mapping", flag_with(("route", "/v1")), "flags[0].route", "mapping"),
    ("bool wrong type", flag_with(("advance_requires_evidence", "maybe")),
     "flags[0].advance_requires_evidence", "true or false"),
    ("list wrong type", flag_with(("shadows", {"v3": 1})), "flags[0].shadows", "list"),
    ("name wrong type", flag_with(("stable.name", 7)), "flags[0].stable.name", "string"),
    ("weight above 1", flag_with(("variants.0.weight", 1.5)),
     "flags[0].variants[0].weight", "less than or equal to 1"),
    ("weight below 0", flag_with(("variants.0.weight", -0.1)),
     "flags[0].variants[0].weight", "greater than or equal to 0"),
    ("weight NaN", flag_with(("variants.0.weight", math.nan)),
     "flags[0].variants[0].weight", "finite"),
    ("weight boolean", flag_with(("variants.0.weight", True)),
     "flags[0].variants[0].weight", "must be a number"),
    ("step weight above 1", flag_with(("schedule.steps.1.weight", 2)),
     "flags[0].schedule.steps[1].weight", "less than or equal to 1"),
    ("sample above 1", flag_with(("shadows.0.sample", 1.5)),
     "flags[0].shadows[0].sample", "less than or equal to 1"),
    ("fixed arms above 1", flag_with(("variants.0.weight", 0.8), ("variants", [
        {"name": "a", "upstream": "http://a", "weight": 0.6},
        {"name": "b", "upstream": "http://b", "weight": 0.5}])),
     "flags[0].variants", "sum to 1.1"),
    ("e0 >= e1", flag_with(("guard.e0", 0.1)), "flags[0].guard.e1", "greater than e0"),
    ("e0 == e1", flag_with(("guard.e0", 0.05)), "flags[0].guard.e1", "greater than e0"),
    ("e0 zero", flag_with(("guard.e0", 0)), "flags[0].guard.e0", "greater than 0"),
    ("e1 one", flag_with(("guard.e1", 1)), "flags[0].guard.e1", "less than 1"),
    ("alpha + beta", flag_with(("guard.alpha", 0.5), ("guard.beta", 0.5)),
     "flags[0].guard.beta", "alpha + beta must be below 1"),
    ("p0 zero", flag_with(("schedule", {"kind": "exponential", "p0": 0, "rate": "0.1/h"})),
     "flags[0].schedule.p0", "greater than 0"),
    ("p0 above 1", flag_with(("schedule", {"kind": "exponential", "p0": 1.5, "rate": "1/h"})),
     "flags[0].schedule.p0", "less than or equal to 1"),
    ("rate garbage", flag_with(("schedule", {"kind": "exponential", "p0": 0.1, "rate": "fast"})),
     "flags[0].schedule.rate", "rate such as 0.1/h"),
    ("negative hold", flag_with(("schedule.steps.0.hold", "-5m")),
     "flags[0].schedule.steps[0].hold", "negative"),
    ("negative seconds", flag_with(("schedule.steps.0.hold", -1)),
     "flags[0].schedule.steps[0].hold", "negative"),
    ("garbage hold", flag_with(("schedule.steps.0.hold", "soon")),
     "flags[0].schedule.steps[0].hold", "duration such as"),
    ("boolean hold", flag_with(("schedule.steps.0.hold", True)),
     "flags[0].schedule.steps[0].hold", "duration such as"),
    ("guard window retired", flag_with(("guard.window", "5m")),
     "flags[0].guard.window", "ratio"),
    ("guard epsilon retired", flag_with(("guard.mode", "relative"), ("guard.epsilon", 0.005)),
     "flags[0].guard.epsilon", "ratio"),
    ("guard ratio one", flag_with(("guard.mode", "relative"), ("guard.ratio", 1)),
     "flags[0].guard.ratio", "greater than 1"),
    ("guard ratio below one", flag_with(("guard.ratio", 0.5)),
     "flags[0].guard.ratio", "greater than 1"),
    ("duplicate flag key", two_flags(minimal(prefix="/v2")), "flags[1].key", "duplicate flag key"),
    ("canary named like stable", flag_with(("canary.name", "v1")),
     "flags[0].canary.name", "duplicate variant name"),
    ("duplicate fixed arm", flag_with(("variants", [
        {"name": "a", "upstream": "http://a", "weight": 0.1},
        {"name": "a", "upstream": "http://b", "weight": 0.1}])),
     "flags[0].variants[1].name", "duplicate variant name"),
    ("shadow named like an arm", flag_with(("shadows.0.name", "v2")),
     "flags[0].shadows[0].name", "duplicate variant name"),
    ("reserved arm name", flag_with(("variants.0.name", "stable")),
     "flags[0].variants[0].name", "reserved"),
    ("rule names unknown variant", flag_with(("rules.0.then", "v9")),
     "flags[0].rules[0].then", "unknown variant 'v9'"),
    ("rule names missing canary", flag_with(("canary", DROP)),
     "flags[0].rules[0].then", "has no canary"),
    ("overlapping routes", two_flags(minimal(key="other")), "flags[1].route", "overlaps"),
    ("overlap, trailing slash", two_flags(minimal(key="other", prefix="/v1/sentiment/")),
     "flags[1].route", "overlaps"),
    ("ftp upstream", flag_with(("stable.upstream", "ftp://127.0.0.1")),
     "flags[0].stable.upstream", "http:// or https://"),
    ("upstream without host", flag_with(("canary.upstream", "http://")),
     "flags[0].canary.upstream", "http:// or https://"),
    ("upstream bare host", flag_with(("canary.upstream", "127.0.0.1:9002")),
     "flags[0].canary.upstream", "http:// or https://"),
    ("upstream credentials", flag_with(("stable.upstream", "http://u:p@host")),
     "flags[0].stable.upstream", "credentials"),
    ("upstream bad IPv6", flag_with(("stable.upstream", "http://[::1")),
     "flags[0].stable.upstream", "not a valid URL"),
    ("upstream bad port", flag_with(("stable.upstream", "http://host:99999")),
     "flags[0].stable.upstream", "port"),
    ("unknown metric", flag_with(("shadows.0.metric", "accuracy")),
     "flags[0].shadows[0].metric", "must be latency_ms, error, agreement or json:"),
    ("json metric without pointer", flag_with(("shadows.0.metric", "json:score")),
     "flags[0].shadows[0].metric", "json:/pointer"),
    ("unknown error kind", flag_with(("guard.errors", ["status_5xx", "oom"])),
     "flags[0].guard.errors[1]", "latency_over:<ms>"),
    ("latency_over zero", flag_with(("guard.errors", ["latency_over:0"])),
     "flags[0].guard.errors[0]", "ms > 0"),
    ("two latency thresholds", flag_with(("guard.errors", ["latency_over:5", "latency_over:9"])),
     "flags[0].guard.errors", "at most one latency_over"),
    ("no error kinds", flag_with(("guard.errors", [])), "flags[0].guard.errors", "at least 1"),
    ("unknown on_canary_error", flag_with(("on_canary_error", "retry")),
     "flags[0].on_canary_error", "'pass' or 'fallback'"),
    ("unknown unit source", flag_with(("unit.from", "jwt")),
     "flags[0].unit.from", "'header', 'cookie', 'query' or 'body'"),
    ("unknown on_missing", flag_with(("unit.on_missing", "drop")),
     "flags[0].unit.on_missing", "'stable', 'random' or 'cookie'"),
    ("unknown assignment", flag_with(("assignment", "random")),
     "flags[0].assignment", "'buckets' or 'unleash'"),
    ("unknown guard mode", flag_with(("guard.mode", "sometimes")),
     "flags[0].guard.mode", "'absolute' or 'relative'"),
    ("unknown schedule kind", flag_with(("schedule.kind", "linear")),
     "flags[0].schedule.kind", "'step' or 'exponential'"),
    ("decreasing steps", flag_with(("schedule.steps.1.weight", 0.001)),
     "flags[0].schedule.steps[1].weight", "must not decrease"),
    ("empty steps", flag_with(("schedule.steps", [])), "flags[0].schedule.steps", "at least 1"),
    ("exponential field on step", flag_with(("schedule.p0", 0.1)),
     "flags[0].schedule.p0", "unknown field"),
    ("bad key pattern", flag_with(("key", "Sentiment!")), "flags[0].key", "a-z, 0-9"),
    ("key too long", flag_with(("key", "k" * 64)), "flags[0].key", "1-63 characters"),
    ("bad variant name", flag_with(("canary.name", "v 2")), "flags[0].canary.name", "letters"),
    ("condition with no test", flag_with(("rules.0.if", {"equals": "x"})),
     "flags[0].rules[0].if", "exactly one of header, cookie, query or unit_in"),
    ("condition with two tests", flag_with(("rules.0.if", {"header": "a", "cookie": "b",
                                                           "equals": "x"})),
     "flags[0].rules[0].if", "got header and cookie"),
    ("condition equals and in", flag_with(("rules.0.if.in", ["a", "b"])),
     "flags[0].rules[0].if", "exactly one of equals or in"),
    ("unit_in with equals", flag_with(("rules.1.if.equals", "x")),
     "flags[0].rules[1].if", "unit_in takes no equals"),
    ("rule without if", flag_with(("rules.0", {"then": "canary"})),
     "flags[0].rules[0].if", "required"),
    ("path_prefix without slash", flag_with(("route.path_prefix", "v1/sentiment")),
     "flags[0].route.path_prefix", "starting with '/'"),
    ("unknown HTTP method", flag_with(("route.methods", ["GET", "FETCH"])),
     "flags[0].route.methods", "unknown HTTP method"),
    ("no HTTP methods", flag_with(("route.methods", [])), "flags[0].route.methods", "at least 1"),
    ("unknown mirror method", flag_with(("mirror_methods", ["BREW"])),
     "flags[0].mirror_methods", "unknown HTTP method"),
    ("host with scheme", flag_with(("route.host", "https://api.example.com")),
     "flags[0].route.host", "host name"),
    ("missing stable", flag_with(("stable", DROP)), "flags[0].stable", "required"),
    ("missing route", flag_with(("route", DROP)), "flags[0].route", "required"),
    ("document not a mapping", [1, 2], "$", "mapping"),
    ("flags not a list", {"flags": {"key": "x"}}, "flags", "list"),
    ("flag not a mapping", {"flags": ["sentiment"]}, "flags[0]", "mapping"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "path", "words"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_document_is_rejected_at_its_path(doc: object, path: str, words: str) -> None:
    errors = errors_of(doc)
    at_path = [e.message for e in errors if e.path == path]
    assert at_path, f"nothing reported at {path}: {errors}"
    assert any(words.lower() in m.lower() for m in at_path), at_path


def test_there_are_many_distinct_invalid_cases() -> None:
    assert len({c[0] for c in INVALID}) == len(INVALID) >= 25


def test_the_example_guard_message_reads_as_documented() -> None:
    errors = errors_of(flag_with(("guard.e0", 0.1)))
    assert "flags[0].guard.e1: must be greater than e0 (0.05 <= 0.1)" in map(str, errors)


# --- several problems at once --------------------------------------------------------------------


def test_every_problem_of_a_broken_flag_is_listed() -> None:
    doc = flag_with(
        ("key", "Bad Key"),
        ("stable.upstream", "ftp://x"),  # the stable arm is invalid ...
        ("canary.name", "v1"),  # ... and still its name is compared with the canary's
        ("guard.e0", 0.2),
        ("guard.alpha", 0.95),
        ("guard.colour", "red"),
        ("schedule.steps", [{"weight": 0.5, "hold": "5m"}, {"weight": 0.2, "hold": "-1m"}]),
        ("variants", [{"name": "a", "upstream": "http://a", "weight": 0.7},
                      {"name": "b", "upstream": "nope", "weight": 0.6}]),
        ("shadows.0.name", "a"),
        ("shadows.0.sample", 2),
        ("rules.0", {"if": {"header": "x", "cookie": "y"}, "then": "v9"}),
    )  # fmt: skip
    paths = sorted(e.path for e in errors_of(doc))
    assert paths == sorted(
        [
            "flags[0].key",
            "flags[0].stable.upstream",
            "flags[0].canary.name",
            "flags[0].guard.e1",
            "flags[0].guard.beta",
            "flags[0].guard.colour",
            "flags[0].schedule.steps[1].hold",
            "flags[0].schedule.steps[1].weight",
            "flags[0].variants[1].upstream",
            "flags[0].variants",  # 0.7 + 0.6 although variants[1] is broken
            "flags[0].shadows[0].name",
            "flags[0].shadows[0].sample",
            "flags[0].rules[0].if",
            "flags[0].rules[0].then",
        ]
    )


def test_every_problem_of_a_flag_set_is_listed() -> None:
    broken = minimal(key="second")  # same route as the first: overlaps
    broken["stable"]["upstream"] = "not-a-url"  # ... even though it is invalid otherwise
    third = minimal(prefix="/v3")  # duplicate key "sentiment"
    third["guard"] = {"e1": 0.001}
    doc = {"flags": [full(), broken, third, 42], "extra": True}
    assert sorted(map(str, errors_of(doc))) == sorted(
        [
            "extra: unknown field",
            "flags[1].stable.upstream: must be an http:// or https:// URL with a host, "
            "got 'not-a-url'",
            "flags[1].route: overlaps the route of flag 'sentiment' (path_prefix '/v1/sentiment')",
            "flags[2].guard.e1: must be greater than e0 (0.001 <= 0.01)",
            "flags[2].key: duplicate flag key 'sentiment' (flags[0])",
            "flags[3]: must be a mapping, got a number",
        ]
    )


def test_a_defaulted_sibling_still_takes_part_in_cross_checks() -> None:
    # e1 and beta are left at their defaults; the rules comparing them still run
    errors = errors_of(flag_with(("guard", {"e0": 0.2, "alpha": 0.95})))
    assert {e.path for e in errors} == {"flags[0].guard.e1", "flags[0].guard.beta"}


def test_each_bad_rule_is_reported_on_its_own() -> None:
    rule = {"if": {"header": "x-a", "equals": "1"}, "then": "v9"}
    errors = errors_of(flag_with(("rules", [rule, rule, {**rule, "then": "v2"}, rule])))
    assert [e.path for e in errors] == [f"flags[0].rules[{i}].then" for i in (0, 1, 3)]


def test_messages_are_for_operators() -> None:
    docs = [doc for _, doc, _, _ in INVALID]
    for doc in docs:
        for error in errors_of(copy.deepcopy(doc)):
            text = str(error)
            assert error.path
            assert error.message
            for leak in ("pydantic", "https://errors", "Traceback", "Value error"):
                assert leak not in text, text


def pathological() -> list[object]:
    deep: list[Any] = []
    for _ in range(50_000):
        deep = [deep]
    cyclic: list[Any] = []
    cyclic.append(cyclic)  # YAML anchors can build this: `a: &x [*x]`
    return [deep, cyclic, 10**5000, -(10**400), "x" * 100_000, math.inf]


@pytest.mark.parametrize(
    "path", ["key", "schedule.kind", "schedule.steps.0.hold", "guard.e0", "rules.0.then", "junk"]
)
def test_pathological_values_give_short_messages(path: str) -> None:
    for value in pathological():
        errors = errors_of(flag_with((path, value)))
        assert f"flags[0].{path}".replace(".0.", "[0].") in {e.path for e in errors}
        assert all(len(e.message) < 300 for e in errors), errors


# --- defaults ------------------------------------------------------------------------------------


def test_a_minimal_flag_gets_every_default_of_design_2() -> None:
    flag = parse_flag(minimal())
    assert (flag.unit.source, flag.unit.name, flag.unit.on_missing) == (
        "header",
        "x-user-id",
        "stable",
    )
    assert (flag.salt, flag.bucket_salt) == (None, "sentiment")
    assert flag.assignment == "buckets"
    assert flag.canary is None
    assert (flag.variants, flag.shadows, flag.rules) == ([], [], [])
    assert isinstance(flag.schedule, StepSchedule)
    assert [(s.weight, s.hold) for s in flag.schedule.steps] == [
        (0.01, 300.0), (0.05, 900.0), (0.25, 1800.0), (1.0, 600.0)
    ]  # fmt: skip
    assert tuple(flag.schedule.steps) == DEFAULT_STEPS
    assert flag.advance_requires_evidence is True
    guard = flag.guard
    assert (guard.e0, guard.e1, guard.alpha, guard.beta) == (0.01, 0.05, 0.01, 0.10)
    assert guard.errors == ["status_5xx", "timeout", "connect_error"]
    assert (guard.mode, guard.ratio) == ("absolute", 2.0)
    assert guard.latency_threshold_ms is None
    assert flag.on_canary_error == "pass"
    assert flag.mirror_methods == ["GET", "POST"]
    assert (flag.route.host, flag.route.methods) == (None, None)
    assert flag.stable.http2 is False
    assert flag.arm_names() == ["v1"]


def test_defaults_are_not_shared_between_flags() -> None:
    a, b = parse_flag(minimal()), parse_flag(minimal(key="b"))
    assert a.guard.errors is not b.guard.errors


def test_shadow_defaults_and_explicit_salt() -> None:
    doc = {**minimal(), "salt": "group-7", "shadows": [{"name": "v3", "upstream": "http://h"}]}
    flag = parse_flag(doc)
    assert flag.bucket_salt == "group-7"
    assert (flag.shadows[0].sample, flag.shadows[0].metrics) == (1.0, ("latency_ms",))


# --- valid documents and their normalisation -----------------------------------------------------


def test_the_example_config_validates() -> None:
    flags = parse_flag_set(yaml.safe_load(EXAMPLE.read_text()))
    flag = flags.get("sentiment")
    assert flag is not None
    assert len(flags.flags) == 1
    assert flag.route.path_prefix == "/v1/sentiment"
    assert flag.stable.upstream == "http://127.0.0.1:9001"
    assert flag.canary is not None
    assert flag.canary.upstream == "http://127.0.0.1:9002"
    assert (flag.unit.source, flag.unit.name) == ("header", "x-user-id")
    assert isinstance(flag.schedule, StepSchedule)
    assert [(s.weight, s.hold) for s in flag.schedule.steps] == [
        (0.01, 300.0), (0.05, 900.0), (0.25, 1800.0), (1.0, 600.0)
    ]  # fmt: skip
    assert flag.advance_requires_evidence
    assert flag.guard == Guard()
    [shadow] = flag.shadows
    assert (shadow.name, shadow.upstream, shadow.sample, shadow.metrics) == (
        "v3", "http://127.0.0.1:9003", 0.1, ("json:/score",)
    )  # fmt: skip
    [rule] = flag.rules
    assert (rule.when.header, rule.when.equals, rule.then) == ("x-canary", "always", "canary")


def test_full_document_validates_and_normalises() -> None:
    doc = full()
    doc["route"] = {"path_prefix": "/v1", "host": "API.Example.com", "methods": ["get", "Post"]}
    doc["canary"]["upstream"] = "https://canary.internal:8443/"
    flag = parse_flag(doc)
    assert (flag.route.host, flag.route.methods) == ("api.example.com", ["GET", "POST"])
    assert flag.canary is not None
    assert flag.canary.upstream == "https://canary.internal:8443"
    assert flag.arm_names() == ["v1", "v2", "v4"]
    assert flag.rules[1].when.unit_in == ["alice", "bob"]


def test_exponential_schedule() -> None:
    doc = {**minimal(), "schedule": {"kind": "exponential", "p0": 1, "rate": "0.1/h"}}
    schedule = parse_flag(doc).schedule
    assert isinstance(schedule, ExponentialSchedule)
    assert (schedule.p0, schedule.hold_at_full) == (1.0, 600.0)
    assert schedule.rate == pytest.approx(0.1 / 3600)


def test_schedule_sections_have_defaults_too() -> None:
    exponential = parse_flag({**minimal(), "schedule": {"kind": "exponential"}}).schedule
    assert isinstance(exponential, ExponentialSchedule)
    assert (exponential.p0, exponential.hold_at_full) == (0.01, 600.0)
    assert exponential.rate == pytest.approx(0.1 / 3600)
    step = parse_flag({**minimal(), "schedule": {"kind": "step"}}).schedule
    assert isinstance(step, StepSchedule)
    assert tuple(step.steps) == DEFAULT_STEPS


def test_step_kind_may_be_left_out_and_empty_lists_may_be_null() -> None:
    doc = {**minimal(), "schedule": {"steps": [{"weight": 1, "hold": 0}]}, "shadows": None}
    flag = parse_flag(doc)
    assert isinstance(flag.schedule, StepSchedule)
    assert flag.shadows == []


def test_guard_with_latency_threshold_and_relative_mode() -> None:
    doc = {**minimal(), "guard": {"errors": ["timeout", "latency_over:250"], "mode": "relative"}}
    assert parse_flag(doc).guard.latency_threshold_ms == 250.0
    doc["guard"] = {"mode": "relative", "ratio": 3}
    assert (parse_flag(doc).guard.mode, parse_flag(doc).guard.ratio) == ("relative", 3.0)


def test_yaml_exponent_without_a_dot_is_a_string_and_the_error_says_so() -> None:
    # YAML 1.1 reads `1e-2` (no dot) as a string: no coercion, but the message says what to write
    doc = load_yaml("key: k\nroute: {path_prefix: /}\nstable: {name: a, upstream: http://a}\n"
                    "guard: {e0: 1e-3, e1: 1e-2}\n")  # fmt: skip
    with pytest.raises(InvalidDocument) as caught:
        parse_flag(doc)
    messages = {e.path: e.message for e in caught.value.errors}
    assert "without a dot" in messages["guard.e1"] and "write 0.01" in messages["guard.e1"]
    assert "write 0.001" in messages["guard.e0"]


def _set(doc: Doc, path: str, value: object) -> None:
    *parents, last = path.split(".")
    target: Any = doc
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[last] = value


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("schedule.steps.0.weight", "0.5", "the string '0.5': write 0.5 without quotes"),
        ("guard.alpha", "yes", "must be a number"),
        ("guard.e0", True, "must be a number"),
        ("advance_requires_evidence", "yes", "true or false"),
        ("advance_requires_evidence", 1, "true or false"),
        ("stable.http2", "true", "true or false"),
    ],
)
def test_no_string_to_number_or_bool_coercion(field: str, value: object, words: str) -> None:
    doc = minimal(key="k")
    doc["schedule"] = {"kind": "step", "steps": [{"weight": 0.1, "hold": "1m"}]}
    doc["canary"] = {"name": "c", "upstream": "http://c"}
    doc["guard"] = {}
    _set(doc, field, value)
    with pytest.raises(InvalidDocument) as caught:
        parse_flag(doc)
    assert any(words in e.message for e in caught.value.errors), caught.value.errors


def test_yaml_yes_is_a_string_not_a_boolean() -> None:
    doc = load_yaml("key: k\nroute: {path_prefix: /}\nstable: {name: a, upstream: http://a, "
                    "http2: yes}\nadvance_requires_evidence: on\n")  # fmt: skip
    with pytest.raises(InvalidDocument) as caught:
        parse_flag(doc)
    paths = {e.path for e in caught.value.errors}
    assert paths == {"stable.http2", "advance_requires_evidence"}


@pytest.mark.parametrize(
    "prefix", ["/v1/../admin", "/v1/..", "/./v1", "/v1/%2e%2e/x", "/v1/%2E", "/a/b/."]
)
def test_dot_segments_in_path_prefix_are_refused(prefix: str) -> None:
    doc = minimal(key="k")
    doc["route"] = {"path_prefix": prefix}
    with pytest.raises(InvalidDocument) as caught:
        parse_flag(doc)
    assert [e.path for e in caught.value.errors] == ["route.path_prefix"]
    assert "'..'" in caught.value.errors[0].message


@pytest.mark.parametrize("prefix", ["/v1/a..b", "/v1/.well-known", "/v1/x.y"])
def test_dots_inside_a_segment_are_fine(prefix: str) -> None:
    doc = minimal(key="k")
    doc["route"] = {"path_prefix": prefix}
    assert parse_flag(doc).route.path_prefix == prefix


def test_overflowing_hold_is_refused_at_its_path() -> None:
    doc = minimal(key="k")
    doc["canary"] = {"name": "c", "upstream": "http://c"}
    doc["schedule"] = {"steps": [{"weight": 0.5, "hold": "999999999999999999d"}]}
    with pytest.raises(InvalidDocument) as caught:
        parse_flag(doc)
    assert [str(e) for e in caught.value.errors] == [
        "schedule.steps[0].hold: must be at most 365d, got '999999999999999999d'"
    ]


def test_routes_on_other_hosts_or_methods_do_not_overlap() -> None:
    a = minimal(key="a")
    b = minimal(key="b")
    c = minimal(key="c")
    a["route"] = {"path_prefix": "/p", "host": "a.example", "methods": ["GET"]}
    b["route"] = {"path_prefix": "/p", "host": "b.example"}
    c["route"] = {"path_prefix": "/p/", "host": "a.example", "methods": ["POST"]}
    assert len(parse_flag_set({"flags": [a, b, c]}).flags) == 3
    d = {**minimal(key="d"), "route": {"path_prefix": "/p"}}  # any host, any method
    assert [e.path for e in errors_of({"flags": [a, b, c, d]})] == ["flags[3].route"] * 3


def test_routes_overlap_directly() -> None:
    base = Route(path_prefix="/x")
    assert routes_overlap(base, Route(path_prefix="/x/"))
    assert not routes_overlap(base, Route(path_prefix="/x/y"))
    get, post = Route(path_prefix="/x", methods=["GET"]), Route(path_prefix="/x", methods=["POST"])
    assert not routes_overlap(get, post)
    assert routes_overlap(get, base)
    flags = [(0, parse_flag(minimal(key="a"))), (3, parse_flag(minimal(key="b")))]
    assert [e.path for e in route_overlaps(flags)] == ["flags[3].route"]


def test_empty_documents_are_empty_flag_sets() -> None:
    assert parse_flag_set(None) == FlagSet()
    assert parse_flag_set({}) == FlagSet()
    assert parse_flag_set({"flags": None}) == FlagSet()


def test_key_pattern_constant_matches_the_validator() -> None:
    for key in ("a", "a.b_c-d", "0" * 63):
        assert re.fullmatch(KEY_PATTERN, key)
        parse_flag(minimal(key=key))


def test_parse_flag_prefixes_paths_and_uses_dollar_for_the_root() -> None:
    with pytest.raises(InvalidDocument) as caught:
        parse_flag({**minimal(), "guard": {"e0": 2}}, path="body")
    assert [str(e) for e in caught.value.errors] == ["body.guard.e0: Input should be less than 1"]
    with pytest.raises(InvalidDocument) as caught:
        parse_flag("nope")
    assert [e.path for e in caught.value.errors] == ["$"]


def test_odd_keys_are_quoted_in_paths() -> None:
    errors = errors_of(flag_with(("in space", 1)))
    assert [e.path for e in errors] == ['flags[0]["in space"]']


def test_direct_construction_applies_the_same_rules() -> None:
    with pytest.raises(ValidationError, match="must be greater than e0"):
        Guard(e0=0.2)
    with pytest.raises(ValidationError, match="exactly one of header"):
        Condition(header="x", cookie="y", equals="1")
    assert Condition(header="x", one_of=["a"]).one_of == ["a"]


# --- JSON, and round trips -----------------------------------------------------------------------


def test_json_parses_like_yaml() -> None:
    from_yaml = parse_flag_set(yaml.safe_load(EXAMPLE.read_text())).flags[0]
    body = json.dumps(yaml.safe_load(EXAMPLE.read_text())["flags"][0])
    assert parse_flag_json(body) == from_yaml
    assert parse_flag_json(body.encode()) == from_yaml
    assert parse_flag(json.loads(json.dumps(full()))) == parse_flag(full())


def test_json_errors_are_invalid_documents() -> None:
    with pytest.raises(InvalidDocument) as caught:
        parse_flag_json("{not json")
    assert caught.value.errors[0].path == "$"
    assert "not valid JSON" in caught.value.errors[0].message
    with pytest.raises(InvalidDocument, match="finite"):
        parse_flag_json(json.dumps({**minimal(), "guard": {"e0": math.nan}}))


@pytest.mark.parametrize("by_alias", [True, False])
def test_a_dumped_flag_parses_back_to_itself(by_alias: bool) -> None:
    flag = parse_flag(full())
    dumped = flag.model_dump(mode="json", by_alias=by_alias)
    assert parse_flag(json.loads(json.dumps(dumped))) == flag


# --- fuzzing -------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(
        [10**400, "5m", "-1s", "0.1/h", "http://h", "GET", "json:/x", "canary", "stable", "v1"]
    )
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = sorted({*full(), *full()["guard"], "p0", "rate", "kind", "steps", "if", "then", "in"})
keys = st.sampled_from(FIELDS) | st.text(max_size=8) | st.integers(-2, 2)


def check(parse: Callable[[Any], object], doc: object) -> None:
    """`parse(doc)` returns, or raises InvalidDocument with a path and a message per error."""
    errors: list[FieldError] = []
    try:
        parse(doc)
    except InvalidDocument as exc:
        errors = exc.errors or [FieldError("", "InvalidDocument without errors")]
    for error in errors:
        assert isinstance(error.path, str)
        assert isinstance(error.message, str)
        assert error.path
        assert error.message


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_is_a_document_or_an_invalid_document(doc: object) -> None:
    check(parse_flag_set, doc)
    check(parse_flag, doc)
    check(parse_flag_set, {"flags": [doc]})
    check(parse_flag_set, {"flags": doc})


def mutate(doc: Any, data: st.DataObject) -> None:
    """Drop a key, swap a value for junk, or inject a junk key, somewhere in `doc`."""
    node = doc
    while True:
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        containers = [(k, v) for k, v in children if isinstance(v, dict | list) and v]
        if not containers or data.draw(st.booleans()):
            break
        _, node = data.draw(st.sampled_from(containers))
    action = data.draw(st.sampled_from(["drop", "swap", "inject"]))
    if action == "inject" and isinstance(node, dict):
        node[data.draw(keys)] = data.draw(json_values)
    elif node:
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        if action == "drop":
            del node[key]
        else:
            node[key] = data.draw(json_values)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutations_of_a_valid_document_never_escape_as_other_errors(data: st.DataObject) -> None:
    doc = {"flags": [full(), minimal(key="two", prefix="/two")]}
    for _ in range(data.draw(st.integers(1, 4))):
        mutate(doc, data)
    check(parse_flag_set, doc)
    check(parse_flag_json, json.dumps(doc, default=str))
