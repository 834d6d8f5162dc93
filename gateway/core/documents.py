"""Flag documents from text: YAML (the flags file) and JSON (the admin API's bodies).

Both loaders are strict where the stock ones are lenient, and raise `InvalidDocument` (never
anything else) listing every problem found:

- only true and false are booleans (YAML 1.2), so `yes` stays the string it looks like;
- a key written twice in one mapping is an error naming the key (the stock loaders keep the last
  value silently, so an edit can vanish);
- a document nested deeper than `MAX_DEPTH`, or larger than `MAX_NODES` values once YAML aliases
  are expanded (a "billion laughs" file is a few lines that expand to 10^9 values), is refused
  before anything walks it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from gateway.errors import FieldError, InvalidDocument


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's booleans: only true and false (any case) are booleans.

    YAML 1.1 also reads yes, no, on, off, y and n as booleans, so `name: no` (Norway) or
    `http2: yes` silently change type; here they stay strings, which validation names.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)

MAX_DEPTH = 64
MAX_NODES = 100_000
_MERGE = "<<"


def load_yaml(text: str) -> object:
    """The document in `text` (YAML, and so also JSON), or InvalidDocument."""
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            errors = _yaml_problems(node)
            if errors:
                raise InvalidDocument(errors)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise InvalidDocument(
            [FieldError("$", f"not valid YAML or JSON: {_problem(exc)}")]
        ) from None
    except RecursionError:
        raise InvalidDocument([FieldError("$", _too_deep())]) from None


def load_json(text: str | bytes) -> object:
    """The JSON document in `text`, or InvalidDocument."""
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        doc = json.loads(text, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as exc:
        message = _too_deep() if isinstance(exc, RecursionError) else f"not valid JSON: {exc}"
        raise InvalidDocument([FieldError("$", message)]) from None
    errors = [
        FieldError("$", f"duplicate key {key!r}: each key once per object") for key in duplicates
    ]
    if not errors and _depth_over(doc):
        errors.append(FieldError("$", _too_deep()))
    if errors:
        raise InvalidDocument(errors)
    return doc


def _yaml_problems(root: yaml.Node) -> list[FieldError]:
    """Duplicate keys (with their path), depth and expanded size, walking without recursion."""
    errors: list[tuple[int, FieldError]] = []  # (line, error): reported in document order
    checked: set[int] = set()  # mappings already checked for duplicates (aliases repeat them)
    stack: list[tuple[yaml.Node, str, int]] = [(root, "", 0)]
    visited = 0
    while stack:
        node, path, depth = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            message = f"more than {MAX_NODES} values once aliases are expanded: refused"
            return [*_in_order(errors), FieldError("$", message)]
        if depth > MAX_DEPTH:
            return [*_in_order(errors), FieldError("$", _too_deep())]
        if isinstance(node, yaml.MappingNode):
            fresh = id(node) not in checked
            checked.add(id(node))
            stack.extend(_mapping_children(node, path, depth, errors if fresh else None))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(node.value))
    return _in_order(errors)


def _in_order(errors: list[tuple[int, FieldError]]) -> list[FieldError]:
    return [error for _, error in sorted(errors, key=lambda pair: pair[0])]


def _mapping_children(
    node: yaml.MappingNode, path: str, depth: int, errors: list[tuple[int, FieldError]] | None
) -> Iterator[tuple[yaml.Node, str, int]]:
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        child = f"{path}.{key}" if path and key is not None else (key or path)
        if errors is not None and isinstance(key, str) and key != _MERGE:
            if key in seen:
                line = key_node.start_mark.line + 1
                message = f"duplicate key {key!r} (again on line {line})"
                errors.append((line, FieldError(child, message)))
            seen.add(key)
        yield value_node, child, depth + 1


def _depth_over(doc: object) -> bool:
    stack: list[tuple[object, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return False


def _too_deep() -> str:
    return f"nested more than {MAX_DEPTH} levels deep: refused"


def _problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
