"""Reading a shadow metric from an answer (control/measure.py): a finite value or a reason."""

from __future__ import annotations

import pytest

from gateway.control.measure import Outcome, measure


def answer(body: bytes, *, status: int = 200, failure: str | None = None) -> Outcome:
    return Outcome("v3", status, failure, 12.5, body)


@pytest.mark.parametrize(
    ("body", "value", "reason"),
    [
        (b'{"score": 0.25}', 0.25, None),
        (b'{"score": 3}', 3.0, None),
        (b'{"a": [1, {"b/c": 2.5}]}', None, None),  # replaced below by the pointer case
        (b'{"score": "NaN"}', None, "/score is not a number (str)"),
        (b'{"score": true}', None, "/score is not a number (bool)"),
        (b'{"score": null}', None, "/score is not a number (NoneType)"),
        (b'{"model": "v3"}', None, "no /score in the body"),
        (b"not json", None, "not JSON"),
        (b'{"score": 1e400}', None, "overflow"),
        (b'{"score": ' + b"9" * 400 + b"}", None, "overflow"),
    ],
)
def test_json_pointer_values_and_reasons(body: bytes, value: float | None, reason: str) -> None:
    if body.startswith(b'{"a"'):
        assert measure("json:/a/1/b~1c", answer(body)) == (2.5, None)
        assert measure("json:/a/7", answer(body)) == (None, "no /a/7 in the body")
        return
    assert measure("json:/score", answer(body)) == (value, reason)


def test_a_failed_answer_has_no_json_value_but_has_the_other_metrics() -> None:
    failed = answer(b"", status=0, failure="connect_error")
    assert measure("json:/score", failed) == (None, "no answer (connect_error)")
    assert measure("error", failed) == (1.0, None)
    assert measure("latency_ms", failed) == (12.5, None)
    assert measure("error", answer(b"", status=503)) == (1.0, None)
    assert measure("error", answer(b"{}")) == (0.0, None)


def test_agreement_compares_status_and_json_body() -> None:
    primary = answer(b'{"a": 1, "b": 2}')
    assert measure("agreement", primary) == (1.0, None)
    assert measure("agreement", answer(b'{"b": 2, "a": 1}'), primary) == (1.0, None)
    assert measure("agreement", answer(b'{"a": 1}'), primary) == (0.0, None)
    assert measure("agreement", answer(b'{"a": 1, "b": 2}', status=201), primary) == (0.0, None)


def test_a_latency_that_is_not_finite_is_a_reason() -> None:
    odd = Outcome("v3", 200, None, float("inf"), b"")
    assert measure("latency_ms", odd) == (None, "not finite (inf)")
