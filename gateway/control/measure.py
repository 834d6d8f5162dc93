"""The value of a shadow metric in one answer (DESIGN 6), or why there is none.

Every metric is read here and nowhere else: `measure(metric, outcome, other)`. A value is a
finite float; anything else (no such JSON pointer, a body that is not JSON, a string or a
boolean where a number should be, a number too large for a double, a failed answer with no
body to read) is a reason, so the pair is logged and counted as unmeasured instead of
poisoning the running statistics or being lost.

Metrics: `latency_ms` (each side's time to its last byte), `error` (1 for a transport failure
or a 5xx), `json:/pointer` (the number at that JSON pointer in each body), `agreement` (the
primary counts 1, the shadow 1 when it answered the same status and body, else 0); on event
streams and LLM answers `ttft_ms`, `completion_tokens`, `stream_gap_p99_ms` and
`len:json:/pointer`, read by `gateway.dataplane.sse.stream_metric`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.dataplane.sse import StreamWatch, stream_metric


@dataclass(frozen=True, slots=True)
class Outcome:
    """One side's answer, as the metric needs it."""

    variant: str
    status: int
    failure: str | None
    ms: float
    body: bytes
    stream: StreamWatch | None = None  # an event stream's timings (sse.py)


Measured = tuple[float, None] | tuple[None, str]
"""(value, None), or (None, the reason there is no value)."""


def measure(metric: str, outcome: Outcome, other: Outcome | None = None) -> Measured:
    """The metric's value in `outcome` (`other` is the primary, for `agreement`)."""
    if metric == "latency_ms":
        return _finite(outcome.ms)
    if metric == "error":
        return (1.0 if outcome.failure is not None or outcome.status >= 500 else 0.0), None
    if metric == "agreement":
        if other is None:
            return 1.0, None
        same = outcome.status == other.status and _same_body(outcome.body, other.body)
        return (1.0 if same else 0.0), None
    if outcome.failure is not None and outcome.stream is None:
        return None, f"no answer ({outcome.failure})"
    if outcome.stream is not None or not metric.startswith("json:"):
        # the LLM metrics (ttft_ms, completion_tokens, ..., len:json:), read by sse.py
        value = stream_metric(metric, outcome.body, outcome.stream)
        return (None, f"no {metric} in the answer") if value is None else _finite(value)
    return json_pointer_number(outcome.body, metric.removeprefix("json:"))


def json_pointer_number(body: bytes, pointer: str) -> Measured:
    """The finite number at `pointer` (RFC 6901) in the JSON `body`."""
    try:
        node: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson refuses a number beyond a double's range as a whole document
        return None, "overflow" if "infinity" in str(exc) else "not JSON"
    for raw in pointer.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None, f"no {pointer} in the body"
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None, f"{pointer} is not a number ({type(node).__name__})"
    try:
        return _finite(float(node))
    except OverflowError:  # an integer beyond a double's range
        return None, "overflow"


def _finite(value: float) -> Measured:
    return (value, None) if math.isfinite(value) else (None, f"not finite ({value!r})")


def _same_body(a: bytes, b: bytes) -> bool:
    if a == b:
        return True
    try:
        return bool(orjson.loads(a) == orjson.loads(b))
    except orjson.JSONDecodeError:
        return False
