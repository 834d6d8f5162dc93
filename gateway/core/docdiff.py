"""What changed between two JSON documents, as a flat list of `{path, op, before, after}`.

Used by the admin API's audit (what an edit did) and by `gateway flags apply --dry-run` (what an
edit would do), so both say the same thing in the same words.

    diff({"canary": {"upstream": "http://a"}}, {"canary": {"upstream": "http://b"}})
    == [{"path": "canary.upstream", "op": "changed", "before": "http://a", "after": "http://b"}]

Paths are written like the validation errors' (`schedule.steps[1].weight`, `["odd key"]`), and
`$` when the documents themselves differ at the top. `op` tells an added or removed entry from
one whose value is null: `added` has `before` None, `removed` has `after` None.

Dicts are compared key by key (keys of `before` in their order, then keys only `after` has);
lists index by index, the longer one's tail reported as added or removed items. JSON equality
is used for leaves: 1 == 1.0, but true is not 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
ROOT = "$"


def diff(before: object, after: object) -> list[dict[str, Any]]:
    """Every leaf-level difference from `before` to `after`; [] when they are equal."""
    changes: list[dict[str, Any]] = []
    _walk(before, after, "", changes)
    return changes


def _walk(before: object, after: object, path: str, out: list[dict[str, Any]]) -> None:
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        _walk_mappings(before, after, path, out)
    elif _is_list(before) and _is_list(after):
        _walk_lists(before, after, path, out)
    elif not _same(before, after):
        out.append(_change(path, "changed", before, after))


def _walk_mappings(
    before: Mapping[Any, Any], after: Mapping[Any, Any], path: str, out: list[dict[str, Any]]
) -> None:
    for key, old in before.items():
        child = _join(path, key)
        if key in after:
            _walk(old, after[key], child, out)
        else:
            out.append(_change(child, "removed", old, None))
    for key, new in after.items():
        if key not in before:
            out.append(_change(_join(path, key), "added", None, new))


def _walk_lists(
    before: Sequence[object], after: Sequence[object], path: str, out: list[dict[str, Any]]
) -> None:
    for i, (old, new) in enumerate(zip(before, after, strict=False)):
        _walk(old, new, f"{path}[{i}]", out)
    for i in range(len(after), len(before)):
        out.append(_change(f"{path}[{i}]", "removed", before[i], None))
    for i in range(len(before), len(after)):
        out.append(_change(f"{path}[{i}]", "added", None, after[i]))


def _change(path: str, op: str, before: object, after: object) -> dict[str, Any]:
    return {"path": path or ROOT, "op": op, "before": before, "after": after}


def _is_list(value: object) -> TypeGuard[Sequence[object]]:
    return isinstance(value, list | tuple)


def _same(a: object, b: object) -> bool:
    # bool is an int in Python, but JSON's true and 1 are different values.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, Mapping) or isinstance(b, Mapping) or _is_list(a) or _is_list(b):
        return False  # containers of the same kind were walked; a container vs a leaf differs
    return a == b


def _join(path: str, key: object) -> str:
    if isinstance(key, str) and _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}" if path else key
    text = key if isinstance(key, str) else str(key)
    return f"{path}[{json.dumps(text)}]"
