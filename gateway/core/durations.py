"""Human durations (`90s`, `5m`, `1h30m`, `250ms`) and rates (`0.1/h`) as plain seconds."""

from __future__ import annotations

import re

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_RATE = re.compile(r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*/\s*(ms|s|m|h|d)")


def parse_duration(value: object) -> float:
    """Seconds in `value`: a non-negative number of seconds or a string such as `1h30m`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION.fullmatch(value.strip()):
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _PART.findall(value))
    else:
        raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {value!r}")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"must be a finite duration >= 0, got {value!r}")
    return seconds


def parse_rate(value: object) -> float:
    """A rate per second from `0.1/h`, `2/m` or a bare number (per second); must be > 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a rate such as 0.1/h, got {value!r}")
    if isinstance(value, int | float):
        rate = float(value)
    elif isinstance(value, str) and (match := _RATE.fullmatch(value.strip())):
        rate = float(match.group(1)) / _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"expected a rate such as 0.1/h or 2/m, got {value!r}")
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"must be a finite rate > 0, got {value!r}")
    return rate


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of `seconds` that `parse_duration` reads back."""
    if seconds == int(seconds):
        whole = int(seconds)
        for unit, size in (("h", 3600), ("m", 60)):
            if whole and whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    return f"{seconds:g}s"
