"""Waiting on a condition with a generous deadline, instead of sleeping a fixed time: a busy
2-core CI machine makes a fixed sleep either too short (a flake) or too long (a slow suite)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], what: str, *, within_s: float = 20.0) -> T:
    """Call `check` until it returns something truthy and return that; fail naming `what`
    when `within_s` passes first."""
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {within_s} s waiting for {what}"
        time.sleep(0.05)


def keeps_for(check: Callable[[], object], what: str, *, seconds: float) -> None:
    """Assert `check` holds at every look during `seconds` (for what must NOT change: nothing
    else marks the moment, so some time has to pass; the assertion holds however long it is)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), f"{what} stopped holding"
        time.sleep(0.05)
