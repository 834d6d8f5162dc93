"""Where the shadow's pair lines go: logger `gateway.shadow`, one JSON line each (DESIGN 6).

By default the lines go to standard output, or to the file `shadow.pair_log` names, through
`PairLines`: a handler that keeps them and writes them in one call at most `FLUSH_S` later
(or at once when `MAX_BUFFERED` are waiting, and at shutdown). A line costs no system call of
its own and does not go through `logging`'s record machinery: `write_pair` hands it straight to
that handler while the logger is set up as `configure_pair_log` left it (what that saves is in
bench/RESULTS.md). A handler or filter of the operator's on the logger sends every line through
`logging` again, so it sees every line.
"""

from __future__ import annotations

import asyncio
import logging
import sys

pair_log = logging.getLogger("gateway.shadow")

FLUSH_S = 0.05
MAX_BUFFERED = 1000


class PairLines(logging.Handler):
    """Hands the lines it is given to `target` in batches: one record per `FLUSH_S`, not one
    per line. The target is the standard library's: it opens, writes, flushes, reopens a
    file that `logging.config.dictConfig` (uvicorn's log set-up) closed, and reports a write
    that fails."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self._target = target
        self._lines: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.add(self.format(record))
        except Exception:
            self.handleError(record)

    def add(self, line: str) -> None:
        self.acquire()
        try:
            lines = self._lines
            lines.append(line)
            if len(lines) >= MAX_BUFFERED:
                self._write()
            elif self._flush_on is None or self._flush_on.is_closed():
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no event loop in this thread: nothing would call back
                    self._write()
                    return
                self._flush_on = loop
                loop.call_later(FLUSH_S, self.flush)
        finally:
            self.release()

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_on = None
            self._write()
        finally:
            self.release()

    def _write(self) -> None:
        if self._lines:
            batch = "\n".join(self._lines)
            self._lines.clear()
            self._target.handle(logging.makeLogRecord({"name": pair_log.name, "msg": batch}))

    def close(self) -> None:
        self.flush()
        self._target.close()
        super().close()


def configure_pair_log(path: str | None) -> None:
    """Pair lines go to standard output, or to `path` (`shadow.pair_log`), as bare JSON lines."""
    target: logging.Handler = (
        logging.FileHandler(path, delay=True) if path else logging.StreamHandler(sys.stdout)
    )
    target.setFormatter(logging.Formatter("%(message)s"))
    for old in pair_log.handlers:
        old.close()
    pair_log.handlers[:] = [PairLines(target)]
    pair_log.setLevel(logging.INFO)
    pair_log.propagate = False


def write_pair(line: str) -> None:
    """Log one pair line; straight into `PairLines` while it is the logger's only way out."""
    handlers = pair_log.handlers
    if (
        len(handlers) == 1
        and type(handler := handlers[0]) is PairLines
        and not pair_log.filters
        and not handler.filters
        and handler.level <= logging.INFO
        and pair_log.isEnabledFor(logging.INFO)
    ):
        handler.add(line)
    else:
        pair_log.info(line)


def flush_pair_lines() -> None:
    """Write out the lines waiting in the pair logger's handlers (at shutdown)."""
    for handler in pair_log.handlers:
        handler.flush()
