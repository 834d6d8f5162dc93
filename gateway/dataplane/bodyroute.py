"""Routing and assignment from the JSON request body (DESIGN 2: `route.model`, `unit.from: body`,
an arm's `model`).

Only flags that ask for it read the body this way (`FlagRuntime.reads_body`); the request path of
every other flag never builds a `JsonBody`. The body is parsed at most once, on first use, and
only when it is a JSON object: anything else (not JSON, an array, a number) has no model and no
unit, so a `route.model` flag does not match it and the client is told why.
"""

from __future__ import annotations

from typing import Any

import orjson

_UNPARSED: Any = object()


class JsonBody:
    """A buffered request body, parsed on demand; a per-arm copy with another "model"."""

    __slots__ = ("_doc", "_rewritten", "raw")

    def __init__(self, raw: bytes | None) -> None:
        self.raw = raw
        self._doc: Any = _UNPARSED
        self._rewritten: dict[str, bytes] | None = None

    @property
    def doc(self) -> dict[str, Any] | None:
        """The body as a JSON object, or None when it is empty, not JSON or not an object."""
        if self._doc is _UNPARSED:
            self._doc = None
            if self.raw:
                try:
                    doc = orjson.loads(self.raw)
                except orjson.JSONDecodeError:
                    doc = None
                self._doc = doc if isinstance(doc, dict) else None
        return self._doc  # type: ignore[no-any-return]

    def model(self) -> str | None:
        """The body's "model" when it is a string; None otherwise (a number is no model name)."""
        doc = self.doc
        value = doc.get("model") if doc is not None else None
        return value if isinstance(value, str) else None

    def unit(self, pointer: str) -> str | None:
        """The unit id at `pointer`: a string, or an integer written in decimal; else None."""
        value = resolve(self.doc, pointer)
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return None

    def no_model_reason(self) -> str:
        """Why no `route.model` flag took this request, for the client's 404."""
        doc = self.doc
        if doc is None:
            return "the request body is not a JSON object, so it names no model"
        value = doc.get("model")
        if value is None:
            return 'the request body has no "model" field'
        if not isinstance(value, str):
            return 'the request body\'s "model" is not a string'
        shown = value if len(value) <= 80 else value[:77] + "..."
        return f"no flag on this path serves model {shown!r}"

    def for_model(self, model: str) -> bytes | None:
        """The body with "model" set to `model` (the raw body if it is not a JSON object).

        One copy per model name, made on first use: a fallback to stable or a second arm with
        the same model reuses it. The upstream client frames it, so Content-Length follows.
        """
        doc = self.doc
        if doc is None or doc.get("model") == model:
            return self.raw
        if self._rewritten is None:
            self._rewritten = {}
        body = self._rewritten.get(model)
        if body is None:
            body = self._rewritten[model] = orjson.dumps({**doc, "model": model})
        return body


def with_model(body: bytes | None, model: str) -> bytes | None:
    """`body` with its "model" replaced, for one-off uses (a shadow's copy)."""
    return JsonBody(body).for_model(model)


def resolve(doc: object, pointer: str) -> object:
    """The value at an RFC 6901 JSON pointer, or None where the path does not exist."""
    node = doc
    for raw in pointer.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
