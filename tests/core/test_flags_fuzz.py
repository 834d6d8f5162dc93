"""What tests/core/test_flags.py's fuzzing leaves out: inputs only YAML or a raw body can carry.

test_flags.py feeds JSON values to the validator. A flags file is YAML, whose loader also makes
dates, datetimes, bytes, sets, NaN and non-string keys; and PUT /admin/flags/{key} hands
`parse_flag_json` whatever bytes arrived. For all of it the validator must return a flag or
raise InvalidDocument with a non-empty `path: message` per problem, never anything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.flags import parse_flag, parse_flag_json, parse_flag_set
from gateway.errors import FieldError, InvalidDocument


def check(parse: Callable[[Any], object], doc: object) -> None:
    errors: list[FieldError] = []
    try:
        parse(doc)
    except InvalidDocument as exc:
        errors = exc.errors or [FieldError("", "InvalidDocument without errors")]
    for error in errors:
        assert isinstance(error.path, str) and error.path, error
        assert isinstance(error.message, str) and error.message, error


yaml_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.just(math.nan)
    | st.just(10**400)
    | st.text(max_size=8)
    | st.binary(max_size=8)  # !!binary
    | st.dates()  # `hold: 2024-01-01`
    | st.datetimes()
    | st.sampled_from(["5m", "0.1/h", "http://h", "step", "exponential", "canary", "/", "v1"])
)
FIELDS = ["key", "route", "path_prefix", "stable", "canary", "name", "upstream", "schedule"]
FIELDS += ["steps", "weight", "hold", "kind", "guard", "rules", "if", "then", "flags"]
yaml_keys = (
    st.sampled_from(FIELDS)
    | st.text(max_size=6)
    | st.integers(-2, 2)
    | st.none()  # `~: x`
    | st.booleans()  # `yes: x`
    | st.dates()
    | st.tuples(st.integers(0, 2))  # a complex key `? [1]`
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(yaml_keys, inner, max_size=4)
        | st.frozensets(st.integers(), max_size=2)  # !!set
        | st.tuples(inner)
    ),
    max_leaves=15,
)
BASE = {"key": "k", "route": {"path_prefix": "/"}, "stable": {"name": "a", "upstream": "http://a"}}
SECTIONS = ["route", "unit", "stable", "canary", "variants", "schedule", "guard", "shadows"]
SECTIONS += ["rules", "salt", "mirror_methods"]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_values)
def test_any_yaml_value_is_a_document_or_an_invalid_document(doc: object) -> None:
    check(parse_flag, doc)
    check(parse_flag_set, doc)
    check(parse_flag_set, {"flags": [doc]})
    for section in SECTIONS:  # in place of each section of an otherwise valid flag
        check(parse_flag, {**BASE, section: doc})


@settings(max_examples=500, deadline=None)
@given(st.text() | st.binary())
def test_any_body_is_a_document_or_an_invalid_document(body: str | bytes) -> None:
    check(parse_flag_json, body)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5000))
def test_deep_nesting_is_an_invalid_document(depth: int) -> None:
    check(parse_flag_json, "[" * depth + "]" * depth)
    check(parse_flag_json, '{"a":' * depth + "1" + "}" * depth)
    nested: dict[str, Any] = {}
    for _ in range(depth):
        nested = {"x": nested}
    check(parse_flag, {**BASE, "route": nested, "stable": nested})
