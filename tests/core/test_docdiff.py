"""docdiff: known answers for each shape, and properties that hold for any JSON documents."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.docdiff import diff


def change(path: str, op: str, before: Any, after: Any) -> dict[str, Any]:
    return {"path": path, "op": op, "before": before, "after": after}


def test_identical_documents_give_nothing() -> None:
    doc = {"key": "a", "route": {"path_prefix": "/a"}, "steps": [{"weight": 0.1}], "x": None}
    assert diff(doc, copy.deepcopy(doc)) == []
    assert diff({}, {}) == []
    assert diff([], []) == []
    assert diff(None, None) == []


def test_nested_dicts_name_the_leaf() -> None:
    before = {"canary": {"name": "v2", "upstream": "http://a:1"}, "guard": {"e0": 0.01}}
    after = {"canary": {"name": "v2", "upstream": "http://b:1"}, "guard": {"e0": 0.02}}
    assert diff(before, after) == [
        change("canary.upstream", "changed", "http://a:1", "http://b:1"),
        change("guard.e0", "changed", 0.01, 0.02),
    ]


def test_added_and_removed_keys_in_document_order() -> None:
    before = {"salt": "s", "route": {"path_prefix": "/a", "host": "x"}}
    after = {"route": {"path_prefix": "/a", "methods": ["GET"]}, "canary": {"name": "v2"}}
    assert diff(before, after) == [
        change("salt", "removed", "s", None),
        change("route.host", "removed", "x", None),
        change("route.methods", "added", None, ["GET"]),
        change("canary", "added", None, {"name": "v2"}),
    ]


def test_lists_index_by_index_with_the_tail_added_or_removed() -> None:
    before = {"schedule": {"steps": [{"weight": 0.1, "hold": "5m"}, {"weight": 0.5}]}}
    after = {"schedule": {"steps": [{"weight": 0.2, "hold": "5m"}, {"weight": 0.5}, {"weight": 1}]}}
    assert diff(before, after) == [
        change("schedule.steps[0].weight", "changed", 0.1, 0.2),
        change("schedule.steps[2]", "added", None, {"weight": 1}),
    ]
    assert diff({"m": ["GET", "POST"]}, {"m": ["GET"]}) == [change("m[1]", "removed", "POST", None)]
    assert diff([[1, 2]], [[1, 3]]) == [change("[0][1]", "changed", 2, 3)]


def test_a_null_value_is_not_an_absent_key() -> None:
    assert diff({"canary": None}, {}) == [change("canary", "removed", None, None)]
    assert diff({}, {"canary": None}) == [change("canary", "added", None, None)]
    assert diff({"canary": None}, {"canary": {"name": "v2"}}) == [
        change("canary", "changed", None, {"name": "v2"})
    ]


def test_json_equality_for_leaves() -> None:
    assert diff({"w": 1}, {"w": 1.0}) == []
    assert diff({"flag": True}, {"flag": 1}) == [change("flag", "changed", True, 1)]
    assert diff({"flag": 0}, {"flag": False}) == [change("flag", "changed", 0, False)]
    assert diff({"a": "1"}, {"a": 1}) == [change("a", "changed", "1", 1)]


def test_container_against_leaf_and_whole_documents() -> None:
    assert diff({"a": {"b": 1}}, {"a": [1]}) == [change("a", "changed", {"b": 1}, [1])]
    assert diff({"a": 1}, "text") == [change("$", "changed", {"a": 1}, "text")]
    assert diff({"a": {}}, {"a": {}}) == []


def test_keys_that_are_not_identifiers_are_quoted() -> None:
    assert diff({"odd key": 1, "1x": {"y": 2}}, {"odd key": 2, "1x": {"y": 3}}) == [
        change('["odd key"]', "changed", 1, 2),
        change('["1x"].y', "changed", 2, 3),
    ]
    assert diff({"a-b_c": 1}, {"a-b_c": 2}) == [change("a-b_c", "changed", 1, 2)]


def test_tuples_count_as_lists() -> None:
    assert diff({"m": ("GET",)}, {"m": ["GET"]}) == []


# --- properties --------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text("ab", max_size=2)
json_docs = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text("abk", max_size=2), inner, max_size=3)
    ),
    max_leaves=12,
)


def _apply(before: Any, changes: list[dict[str, Any]], after: Any) -> Any:
    """Replays a diff on `before` by walking `after`'s structure: proves nothing was missed."""
    doc = copy.deepcopy(before)
    for c in changes:
        doc = _set(doc, _steps(c["path"]), c["op"], c["after"])
    return doc


def _steps(path: str) -> list[str | int]:
    if path == "$":
        return []
    steps: list[str | int] = []
    for name, quoted, index in re.findall(
        r'\.?([A-Za-z_][A-Za-z0-9_-]*)|\[("(?:[^"\\]|\\.)*")\]|\[(\d+)\]', path
    ):
        steps.append(name or (json.loads(quoted) if quoted else int(index)))
    return steps


def _set(doc: Any, steps: list[str | int], op: str, value: Any) -> Any:
    if not steps:
        return value
    head, rest = steps[0], steps[1:]
    if rest:
        doc[head] = _set(doc[head], rest, op, value)
    elif op == "removed":
        del doc[head]  # list tails come last to first (see the caller), so indexes hold
    elif isinstance(doc, list) and head == len(doc):
        doc.append(value)
    else:
        doc[head] = value
    return doc


@given(json_docs, json_docs)
def test_equal_iff_no_changes(a: Any, b: Any) -> None:
    assert (diff(a, b) == []) == _json_equal(a, b)
    assert diff(a, a) == []


@given(json_docs, json_docs)
def test_replaying_the_diff_gives_the_new_document(a: Any, b: Any) -> None:
    changes = diff(a, b)
    # Removing list items by index must go from the end, so replay removals last, reversed.
    ordered = [c for c in changes if c["op"] != "removed"] + [
        c for c in reversed(changes) if c["op"] == "removed"
    ]
    assert _json_equal(_apply(a, ordered, b), b)


@given(json_docs, json_docs)
def test_reversed_diff_swaps_before_and_after(a: Any, b: Any) -> None:
    forward, backward = diff(a, b), diff(b, a)
    flip = {"added": "removed", "removed": "added", "changed": "changed"}
    swapped = [
        {"path": c["path"], "op": flip[c["op"]], "before": c["after"], "after": c["before"]}
        for c in forward
    ]
    assert sorted(map(repr, swapped)) == sorted(map(repr, backward))


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict | list) or isinstance(b, dict | list):
        return False
    return bool(a == b)
