"""Child processes of the bench: start on a free port, wait until they answer, always stop.

Each child gets its own session (process group), so a Ctrl-C in the terminal reaches only the
bench and wrk, and teardown can stop a child together with its workers (nginx, uvicorn).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import cpu


class StartError(Exception):
    """A child exited or did not answer in time; the message ends with its log's tail."""


@dataclass(frozen=True, slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(port: int, path: str = "/") -> bool:
    """True once anything speaks HTTP on the port (any status: readiness, not health)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def pings(port: int) -> bool:
    """True once a Redis server answers PING on the port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def listening(port: int) -> int:
    """How many sockets listen on the TCP port: one per worker when they bind with
    SO_REUSEPORT, so `--workers 2` is ready when this says 2 (Linux /proc; 0 elsewhere)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows, None)
                for row in rows:
                    fields = row.split()  # sl local_address rem_address st ...
                    local, state = fields[1], fields[3]
                    count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
        except OSError:
            continue
    return count


def wait_listening(child: Child, count: int, *, timeout_s: float = 30.0) -> None:
    """Wait until `count` sockets listen on the child's port (its workers are all up)."""
    deadline = time.monotonic() + timeout_s
    while listening(child.port) < count:
        if child.process.poll() is not None:
            raise StartError(f"exited with {child.process.returncode}:\n{tail(child.log)}")
        if time.monotonic() > deadline:
            found = listening(child.port)
            raise StartError(f"{found} of {count} workers listening after {timeout_s:.0f} s")
        time.sleep(0.1)


def wait_settled(
    child: Child, *, below: float = 0.1, window_s: float = 0.5, timeout_s: float = 30.0
) -> float:
    """Wait until the child and its workers use less than `below` of a core over `window_s`,
    and return the seconds waited. Answering is not being done with start-up: the gateway
    imports scipy in a thread for 1.5-4 s after it answers, taking the GIL from requests."""
    started = time.monotonic()
    used = cpu.tree_seconds(child.process.pid)
    while time.monotonic() - started < timeout_s:
        time.sleep(window_s)
        now = cpu.tree_seconds(child.process.pid)
        if now - used < below * window_s:
            break
        used = now
    return time.monotonic() - started


Probe = Callable[[int], bool]


class Fleet:
    """Every child started in a `with Fleet(workdir) as fleet:` block is stopped at its end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._children: list[Child] = []

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for child in reversed(self._children):
            self.stop(child)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        ready: Probe = answers,
        timeout_s: float = 20.0,
    ) -> Child:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, process, port, log)
        self._children.append(child)
        try:
            _wait_ready(child, ready, timeout_s=timeout_s)
        except StartError:
            self.stop(child)
            raise
        return child

    def stop(self, child: Child) -> None:
        if child in self._children:
            self._children.remove(child)
        if child.process.poll() is None:
            _signal_group(child.process, signal.SIGTERM)
            try:
                child.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _signal_group(child.process, signal.SIGKILL)
                child.process.wait()
        # Workers left behind by a master that died first still share its group id.
        _signal_group(child.process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _wait_ready(child: Child, ready: Probe, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise StartError(f"exited with {child.process.returncode}:\n{tail(child.log)}")
        if ready(child.port):
            return
        time.sleep(0.1)
    raise StartError(f"no answer on port {child.port} after {timeout_s:.0f} s:\n{tail(child.log)}")


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])
