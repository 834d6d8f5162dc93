"""`Deadlines` (gateway/dataplane/deadlines.py) on a real uvloop event loop: every timer that is not
stopped fires once, not before its delay, and a stopped one never fires.

Times are read from the loop's own clock, which libuv keeps in whole milliseconds, so "not
before" allows that millisecond. Nothing here bounds how late a timer fires.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import pytest
import uvloop

from gateway.dataplane.deadlines import Deadlines

MS = 0.001


def recorder(delay_s: float, resolution_s: float) -> tuple[Deadlines[Any, None], list[Any]]:
    """Deadlines whose timers append their key to the returned list as they fire."""
    fired: list[Any] = []
    deadlines: Deadlines[Any, None] = Deadlines(
        delay_s, lambda key, _: fired.append(key), resolution_s=resolution_s
    )
    return deadlines, fired


def test_every_timer_not_stopped_fires_once_and_not_before_its_delay() -> None:
    delay = 0.02
    started: dict[int, float] = {}
    fired: list[tuple[int, float]] = []
    stopped: set[int] = set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        all_fired = asyncio.Event()

        def on_due(key: int, _: float) -> None:
            fired.append((key, loop.time()))
            if not len(deadlines):
                all_fired.set()

        deadlines: Deadlines[int, float] = Deadlines(delay, on_due, resolution_s=0.005)
        rng = random.Random(7)
        pending: dict[int, dict[int, float]] = {}
        for key in range(600):
            started[key] = loop.time()
            pending[key] = deadlines.start(key, started[key])
            if rng.random() < 0.5 and pending:  # stop some timer still waiting, or fired
                victim = rng.choice(list(pending))
                deadlines.stop(victim, pending.pop(victim))
                if victim not in {k for k, _ in fired}:
                    stopped.add(victim)
            await asyncio.sleep(rng.choice([0, 0, 0.001, 0.003]))
        all_fired.clear()  # it may have been set while timers were still being started
        if len(deadlines):
            await asyncio.wait_for(all_fired.wait(), timeout=10)
        # Slices left empty by stopped timers are due by now too; then nothing stays armed.
        await asyncio.sleep(delay + 0.005 + 0.02)
        assert not deadlines.armed

    uvloop.run(main())
    keys = [key for key, _ in fired]
    assert len(keys) == len(set(keys)), "a timer fired twice"
    assert set(keys) == set(started) - stopped
    assert stopped, "the run stopped no timer before it fired"
    early = [(key, at - started[key]) for key, at in fired if at < started[key] + delay - MS]
    assert early == []


def test_a_stopped_timer_does_not_fire_and_stopping_a_fired_one_does_nothing() -> None:
    deadlines, fired = recorder(0.01, 0.005)

    async def main() -> None:
        kept = deadlines.start("kept", None)
        dropped = deadlines.start("dropped", None)
        deadlines.stop("dropped", dropped)
        assert len(deadlines) == 1
        await asyncio.sleep(0.05)
        deadlines.stop("kept", kept)  # already fired
        again = deadlines.start("kept", None)  # a key may start again once it fired
        await asyncio.sleep(0.05)
        deadlines.stop("kept", again)

    uvloop.run(main())
    assert fired == ["kept", "kept"]


def test_a_callback_may_stop_another_timer_of_its_slice(caplog: pytest.LogCaptureFixture) -> None:
    """Timers of one slice fire together; one that stops a later one of the same slice wins,
    and one that raises does not keep the others from firing."""
    fired: list[str] = []
    slices: dict[str, dict[str, None]] = {}

    def on_due(key: str, _: None) -> None:
        fired.append(key)
        if key == "boom":
            raise RuntimeError("callback failed")
        other = "b" if key == "a" else "a"
        Deadlines.stop(other, slices[other])

    deadlines: Deadlines[str, None] = Deadlines(0.01, on_due, resolution_s=1.0)

    async def main() -> None:
        for key in ("boom", "a", "b"):  # one slice: the resolution is far above the delay
            slices[key] = deadlines.start(key, None)
        assert slices["a"] is slices["b"] is slices["boom"]
        await asyncio.sleep(1.1)

    with caplog.at_level(logging.ERROR, logger="gateway.dataplane.deadlines"):
        uvloop.run(main())
    assert sorted(fired) in (["a", "boom"], ["b", "boom"]), fired
    assert "a timer's callback failed" in caplog.text


def test_stopped_timers_leave_nothing_armed_once_their_slices_are_due() -> None:
    """At light load every request's timer has a slice of its own and is stopped long before
    it is due. The loop timer is left set when they stop; when it runs it skips the slices
    that are empty by then, and with none left nothing is armed and nothing fired."""
    deadlines, fired = recorder(0.2, 0.01)

    async def main() -> tuple[bool, bool]:
        slices = []
        for key in range(3):  # before the first is due
            timers = deadlines.start(key, None)
            deadlines.stop(key, timers)
            slices.append(timers)
            await asyncio.sleep(0.011)
        assert len({id(timers) for timers in slices}) > 1
        armed_after_stops = deadlines.armed
        await asyncio.sleep(0.3)  # every slice is due by now
        return armed_after_stops, deadlines.armed

    assert uvloop.run(main()) == (True, False)
    assert fired == []


def test_close_drops_every_timer_and_the_loop_timer() -> None:
    deadlines, fired = recorder(0.01, 0.005)

    async def main() -> None:
        for key in range(10):
            deadlines.start(key, None)
        assert deadlines.armed
        deadlines.close()
        assert (len(deadlines), deadlines.armed) == (0, False)
        await asyncio.sleep(0.05)

    uvloop.run(main())
    assert fired == []


def test_delay_and_resolution_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        Deadlines(0, lambda key, value: None, resolution_s=0.1)
    with pytest.raises(ValueError, match="must be > 0"):
        Deadlines(1.0, lambda key, value: None, resolution_s=0)
