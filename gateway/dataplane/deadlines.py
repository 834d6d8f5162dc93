"""Many timers of one delay on one event-loop timer: cheap to start and to stop.

A proxied request needs timers that are nearly always stopped before they fire: the wait for
an upstream's response head and the proxy's watch for a client that leaves. As loop timers,
each would cost a timer handle and a libuv timer to start (`call_later`) and to stop
(`cancel`); here they cost a dict store and a dict pop (bench/RESULTS.md has the figures).

Here a timer is an entry in the dict of the time slice it falls due in: starting it is a
dict store, stopping it a dict pop. One loop timer, armed for the earliest slice while
any slice still holds timers, fires a whole slice at once. A timer therefore fires between
`delay_s` and `delay_s + resolution_s` after it started, never before (by the loop's clock,
give or take its millisecond). Nothing is armed once no timer waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

# libuv keeps time in milliseconds, so the loop may run a timer up to 1 ms before the float
# time it was given; a slice counts as due from then on rather than be armed for again.
_EARLY_S = 0.001


class Deadlines(Generic[K, V]):
    """Timers that each call `on_due(key, value)` once `delay_s` has passed, unless stopped.

    A key is one timer: start it again only after it fired or was stopped. The timers run
    on the event loop that was running when the first of them was started after an idle
    spell.
    """

    __slots__ = ("_delay_s", "_loop", "_on_due", "_per_s", "_slices", "_timer")

    def __init__(
        self, delay_s: float, on_due: Callable[[K, V], object], *, resolution_s: float
    ) -> None:
        if delay_s <= 0 or resolution_s <= 0:
            raise ValueError("delay_s and resolution_s must be > 0")
        self._delay_s = delay_s
        self._per_s = 1.0 / resolution_s
        self._on_due = on_due
        self._slices: deque[tuple[int, dict[K, V]]] = deque()  # (slice number, its timers)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def armed(self) -> bool:
        """Whether a loop timer is set: only while some slice is waiting."""
        return self._timer is not None

    def __len__(self) -> int:
        """Timers started and not yet fired or stopped."""
        return sum(len(timers) for _, timers in self._slices)

    def start(self, key: K, value: V) -> dict[K, V]:
        """Start `key`'s timer; keep the returned slice to stop it with."""
        loop = self._loop
        if loop is None or self._timer is None:
            loop = self._loop = asyncio.get_running_loop()
        # The first slice that ends after the deadline: the timer never fires early.
        number = int((loop.time() + self._delay_s) * self._per_s) + 1
        slices = self._slices
        if slices and slices[-1][0] == number:
            timers = slices[-1][1]
        else:
            timers = {}
            slices.append((number, timers))  # the delay is fixed, so slices come in order
            if self._timer is None:
                self._timer = loop.call_at(number / self._per_s, self._fire)
        timers[key] = value
        return timers

    @staticmethod
    def stop(key: K, timers: dict[K, V]) -> None:
        """Stop `key`'s timer, started into `timers`; nothing happens if it already fired.

        The loop timer stays set: moving it costs what `call_later` and `cancel` cost, and
        at light load every request's timer has a slice of its own. A slice found empty
        when the loop wakes is skipped, and the loop timer moves to the next slice that
        still holds timers, or is dropped."""
        timers.pop(key, None)

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = (loop.time() + _EARLY_S) * self._per_s
        slices, on_due = self._slices, self._on_due
        while slices and slices[0][0] <= now:
            timers = slices.popleft()[1]
            while timers:  # a callback may stop other timers of its slice
                key, value = timers.popitem()
                try:
                    on_due(key, value)
                except Exception:
                    log.exception("a timer's callback failed")
        self._rearm()

    def _rearm(self) -> None:
        """Set the loop timer for the earliest slice that still has timers, if any."""
        slices = self._slices
        while slices and not slices[0][1]:
            slices.popleft()
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop
        if slices and loop is not None:
            self._timer = loop.call_at(slices[0][0] / self._per_s, self._fire)
        else:
            self._timer = None

    def close(self) -> None:
        """Drop every timer without firing it, and the loop timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._slices.clear()
