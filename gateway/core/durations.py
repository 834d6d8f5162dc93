"""Human durations (`90s`, `5m`, `1h30m`, `250ms`) and rates (`0.1/h`) as plain seconds.

Both parsers raise `ValueError` (never anything else) with a message meant for an operator, so
they can sit behind a pydantic validator and report at the field's key path.
"""

from __future__ import annotations

import math
import re
import reprlib
from decimal import Decimal

_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Every duration and rate stays within a year, so any time computed from them (a step's end,
# a ramp's full-traffic time) is a timestamp that clocks and datetimes can hold.
MAX_SECONDS = 365 * 86400.0
MIN_RATE = 1 / MAX_SECONDS
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_RATE = re.compile(r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*/\s*(ms|s|m|h|d)")
_DURATION_HINT = "a duration such as 250ms, 90s, 5m or 1h30m, or a number of seconds"
_RATE_HINT = "a rate such as 0.1/h or 2/m, or a number per second"


def parse_duration(value: object) -> float:
    """Seconds in `value`: a number of seconds or a string such as `1h30m`, from 0 to 365d."""
    seconds = _seconds(value)
    if seconds is None:
        raise ValueError(f"expected {_DURATION_HINT}, got {brief(value)}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {brief(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite duration, got {brief(value)}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"must be at most 365d, got {brief(value)}")
    return seconds + 0.0  # turns -0.0 into 0.0


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None  # a YAML `yes` is not a duration, although bool is an int
    if isinstance(value, int | float):
        return _finite_or_inf(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    negative = text.startswith("-")
    text = text.removeprefix("-").strip() if negative else text
    if not _DURATION.fullmatch(text):
        return None
    seconds = sum(_in_seconds(float(n), unit) for n, unit in _PART.findall(text))
    return -seconds if negative else seconds


def _in_seconds(number: float, unit: str) -> float:
    # dividing by 1000 is exact where multiplying by 0.001 (not a binary fraction) may round
    return number / 1000 if unit == "ms" else number * _UNIT_SECONDS[unit]


def _finite_or_inf(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf if value > 0 else -math.inf


def parse_rate(value: object) -> float:
    """A rate per second from `0.1/h`, `2/m` or a bare number (per second), at least 1/365d."""
    if isinstance(value, bool):
        raise ValueError(f"expected {_RATE_HINT}, got {brief(value)}")
    if isinstance(value, int | float):
        rate = _finite_or_inf(value)
    elif isinstance(value, str) and (match := _RATE.fullmatch(value.strip())):
        rate = float(match.group(1)) / _in_seconds(1.0, match.group(2))
    else:
        raise ValueError(f"expected {_RATE_HINT}, got {brief(value)}")
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"must be a finite rate > 0, got {brief(value)}")
    if rate < MIN_RATE:
        raise ValueError(f"must be at least 1/365d (a ramp longer than a year), got {brief(value)}")
    return rate


def brief(value: object) -> str:
    """repr(value), cut short and depth-limited: a message must stay readable for any input."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = 60
    try:
        return short.repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        return f"a {type(value).__name__} too large to show"


def format_duration(seconds: float) -> str:
    """An exact spelling of `seconds` that `parse_duration` reads back to the same float.

    Whole numbers take the largest unit that divides them (`5m`, `2h`, `90s`); anything else is
    written in seconds with every digit it needs (`0.25s`), never in exponent notation.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be finite and >= 0, got {seconds!r}")
    if seconds == int(seconds):
        whole = int(seconds)
        for unit, size in (("h", 3600), ("m", 60)):
            if whole and whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    # repr is the shortest string that reads back to this float; Decimal spells it positionally
    return f"{Decimal(repr(float(seconds))):f}s"
