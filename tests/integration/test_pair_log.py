"""The pair log's handler on a real file: lines batched, none lost, `logging` kept as the way
in for an operator's own handlers (gateway/control/pairlog.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.control.pairlog import (
    FLUSH_S,
    MAX_BUFFERED,
    PairLines,
    configure_pair_log,
    flush_pair_lines,
    pair_log,
    write_pair,
)


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pairs.jsonl"
    configure_pair_log(str(path))
    yield path
    for handler in pair_log.handlers:
        handler.close()
    pair_log.handlers[:] = []  # as it was before configure_pair_log
    pair_log.setLevel(logging.NOTSET)
    pair_log.propagate = True


def lines(path: Path) -> list[int]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["i"] for line in text.splitlines()]


def pair(i: int) -> str:
    return json.dumps({"i": i})


def test_lines_wait_for_one_write_then_arrive_in_order(log_file: Path) -> None:
    async def run() -> tuple[list[int], list[int]]:
        for i in range(5):
            write_pair(pair(i))
        before = lines(log_file)
        await asyncio.sleep(FLUSH_S * 4)
        return before, lines(log_file)

    before, after = asyncio.run(run())
    assert before == []
    assert after == [0, 1, 2, 3, 4]


def test_a_full_buffer_is_written_at_once(log_file: Path) -> None:
    async def run() -> list[int]:
        for i in range(MAX_BUFFERED):
            write_pair(pair(i))
        return lines(log_file)

    assert asyncio.run(run()) == list(range(MAX_BUFFERED))


def test_without_an_event_loop_each_line_is_written_at_once(log_file: Path) -> None:
    write_pair(pair(1))
    assert lines(log_file) == [1]


def test_lines_left_by_a_closed_loop_go_out_with_the_next_loop(log_file: Path) -> None:
    async def first() -> None:
        write_pair(pair(1))  # its flush is due on this loop, which closes before it runs

    async def second() -> None:
        write_pair(pair(2))
        await asyncio.sleep(FLUSH_S * 4)

    asyncio.run(first())
    assert lines(log_file) == []
    asyncio.run(second())
    assert lines(log_file) == [1, 2]


def test_shutdown_flush_writes_what_waits(log_file: Path) -> None:
    async def run() -> list[int]:
        write_pair(pair(7))
        flush_pair_lines()  # Mirror.drain does this at shutdown
        return lines(log_file)

    assert asyncio.run(run()) == [7]


def test_the_file_survives_a_logging_reconfiguration(log_file: Path) -> None:
    # uvicorn applies its log config with dictConfig, which closes every existing handler.
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    write_pair(pair(3))
    assert lines(log_file) == [3]
    assert isinstance(pair_log.handlers[0], PairLines)


def test_an_operators_handler_gets_every_line_through_logging(log_file: Path) -> None:
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    pair_log.addHandler(Collect())
    write_pair(pair(4))
    write_pair(pair(5))
    assert [json.loads(x)["i"] for x in seen] == [4, 5]
    assert lines(log_file) == [4, 5]  # and the file still gets them, by way of emit()


def test_a_level_above_info_silences_the_pair_lines(log_file: Path) -> None:
    pair_log.setLevel(logging.WARNING)
    write_pair(pair(6))
    flush_pair_lines()
    assert lines(log_file) == []
