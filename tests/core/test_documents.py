"""Strict loading of flag documents: duplicate keys, YAML 1.2 booleans, size and depth limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.documents import MAX_DEPTH, load_json, load_yaml
from gateway.errors import InvalidDocument

LAUGHS = "\n".join(
    [
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(
            f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]"
            for p, n in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def problems(load: object, text: str) -> list[str]:
    with pytest.raises(InvalidDocument) as caught:
        load(text)  # type: ignore[operator]
    return [str(e) for e in caught.value.errors]


def test_duplicate_yaml_keys_are_named_with_their_path() -> None:
    text = "flags:\n  - key: a\n    stable: {name: v1, name: v2}\n    key: b\n"
    assert problems(load_yaml, text) == [
        "flags[0].stable.name: duplicate key 'name' (again on line 3)",
        "flags[0].key: duplicate key 'key' (again on line 4)",
    ]


def test_duplicate_json_keys_are_named() -> None:
    assert problems(load_json, '{"key": "a", "route": {}, "key": "b"}') == [
        "$: duplicate key 'key': each key once per object"
    ]


def test_yaml_merge_keys_are_not_duplicates() -> None:
    text = "base: &b {x: 1}\none: {<<: *b, y: 2}\n"
    assert load_yaml(text) == {"base": {"x": 1}, "one": {"x": 1, "y": 2}}


def test_only_true_and_false_are_booleans() -> None:
    doc = load_yaml("a: yes\nb: no\nc: on\nd: true\ne: False\nf: 1e-2\ng: 1.0e-2\n")
    assert doc == {"a": "yes", "b": "no", "c": "on", "d": True, "e": False, "f": "1e-2", "g": 0.01}


def test_billion_laughs_is_refused_before_anything_walks_it() -> None:
    assert problems(load_yaml, LAUGHS) == [
        "$: more than 100000 values once aliases are expanded: refused"
    ]


@pytest.mark.parametrize("depth", [MAX_DEPTH + 5, 400, 5000, 100_000])
def test_deep_nesting_is_refused(depth: int) -> None:
    for load, text in (
        (load_yaml, "[" * depth + "]" * depth),
        (load_json, "[" * depth + "]" * depth),
    ):
        assert problems(load, text) == [f"$: nested more than {MAX_DEPTH} levels deep: refused"]


@given(st.text(max_size=300))
def test_any_text_loads_or_raises_invalid_document(text: str) -> None:
    for load in (load_yaml, load_json):
        errors = None
        try:
            load(text)
        except InvalidDocument as exc:
            errors = exc.errors
        assert errors is None or errors  # refused, then with at least one reason
