"""A process's open TCP sockets, read from /proc: what a test that counts leaks can show."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


@dataclass(frozen=True, slots=True)
class TcpSocket:
    local_port: int
    peer_port: int
    state: str

    def __str__(self) -> str:
        return f":{self.local_port} -> :{self.peer_port} {self.state}"


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """The TCP sockets process `pid` holds open, sorted."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # an fd closed while we read
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            for line in list(lines)[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    local, peer = (int(a.rsplit(":", 1)[1], 16) for a in cols[1:3])
                    found.append(TcpSocket(local, peer, _STATES.get(cols[3], cols[3])))
    return sorted(found, key=lambda s: (s.local_port, s.peer_port))
