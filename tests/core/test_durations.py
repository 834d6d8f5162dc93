"""Durations and rates as operators write them, and their exact spelling back."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.durations import MAX_SECONDS, format_duration, parse_duration, parse_rate


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("250ms", 0.25),
        ("1m30s500ms", 90.5),
        ("1.5h", 5400.0),
        (" 10m ", 600.0),
        ("0s", 0.0),
        (0, 0.0),
        (300, 300.0),
        (2.5, 2.5),
    ],
)
def test_durations_parse_to_seconds(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("-5m", "negative"),
        (-1, "negative"),
        (-0.5, "negative"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (10**400, "finite"),
        ("9" * 400 + "h", "finite"),
        ("soon", "expected a duration"),
        ("5", "expected a duration"),
        ("5 minutes", "expected a duration"),
        ("5M", "expected a duration"),
        ("m", "expected a duration"),
        ("", "expected a duration"),
        ("1e3s", "expected a duration"),
        (True, "expected a duration"),
        (False, "expected a duration"),
        (None, "expected a duration"),
        ([5], "expected a duration"),
    ],
)
def test_bad_durations_are_rejected(value: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("0.1/h", 0.1 / 3600),
        ("2/m", 2 / 60),
        ("1e-3/s", 0.001),
        ("3 / d", 3 / 86400),
        ("5/ms", 5000.0),
        (0.25, 0.25),
        (1, 1.0),
    ],
)
def test_rates_parse_to_per_second(text: object, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second, rel=1e-12)


@pytest.mark.parametrize(
    "value", ["0/h", 0, -1, "-0.1/h", "0.1", "0.1/week", "fast", math.nan, math.inf, True, None]
)
def test_bad_rates_are_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(value)


def test_huge_values_give_short_messages() -> None:
    with pytest.raises(ValueError, match="expected a duration") as caught:
        parse_duration("x" * 10_000)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (90, "90s"), (300, "5m"), (5400, "90m"), (7200, "2h"), (0.25, "0.25s"),
     (1e-7, "0.0000001s")],
)  # fmt: skip
def test_format_duration_known_spellings(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.floats(min_value=0, max_value=MAX_SECONDS, allow_nan=False, allow_infinity=False))
def test_format_duration_round_trips_any_float(seconds: float) -> None:
    text = format_duration(seconds)
    assert "e" not in text.lower()
    assert parse_duration(text) == seconds


@given(st.integers(min_value=0, max_value=int(MAX_SECONDS)))
def test_format_duration_round_trips_whole_seconds(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("999999999999999999d", "at most 365d"),
        ("366d", "at most 365d"),
        (MAX_SECONDS + 1, "at most 365d"),
        ("365d1s", "at most 365d"),
    ],
)
def test_durations_are_bounded_to_a_year(text: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_duration(text)
    assert parse_duration("365d") == MAX_SECONDS


@pytest.mark.parametrize("text", ["0.002/d", 1e-9, "0.00001/h"])
def test_rates_are_bounded_below_to_one_per_year(text: object) -> None:
    with pytest.raises(ValueError, match="at least 1/365d"):
        parse_rate(text)
    assert parse_rate("0.003/d") == pytest.approx(0.003 / 86400)


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf])
def test_format_duration_refuses_what_is_not_a_duration(seconds: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        format_duration(seconds)
