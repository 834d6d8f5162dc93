"""The local snapshot file (DESIGN 7, `store.snapshot_file`): what a replica knows of the shared
store, on disk, so that it can start while Redis is away and keep what it decided meanwhile.

It holds the replica's image of the store (`flagstore/restore.py`: every flag document with its
version, rollout states, guard counts, shadow statistics) and the rollbacks decided but not yet
written. `SnapshotWriter` writes it whenever that changes (checked every `interval_s`, and once
more on shutdown), atomically: a temporary file in the same directory, flushed to disk, then
renamed over the old one, so a reader sees the old snapshot or the new one, never part of one.
A file written for another store (another prefix or Redis) is ignored, never mixed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.flagstore.base import AuditEvent
from gateway.flagstore.restore import Image, from_json

log = logging.getLogger(__name__)

FORMAT = 1
APP_DIR = "canary-gateway"


def default_state_dir(env: dict[str, str] | None = None) -> Path:
    """`$XDG_STATE_HOME/canary-gateway`, or `~/.local/state/canary-gateway` without it."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / APP_DIR


@dataclass(slots=True)
class Snapshot:
    store: str  # which store it is of: "<where> <prefix>", never a password
    image: Image
    synced_at: float  # when the image was last confirmed against the store
    pending_rollbacks: dict[str, AuditEvent] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = {
            "format": FORMAT,
            "store": self.store,
            "synced_at": self.synced_at,
            "pending_rollbacks": {k: e.as_dict() for k, e in self.pending_rollbacks.items()},
            "image": self.image,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def read(path: Path, *, store: str) -> Snapshot | None:
    """The snapshot at `path`, or None (absent, unreadable, or of another store: logged)."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("snapshot file %s unreadable, not used: %s", path, exc)
        return None
    try:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"not a format {FORMAT} snapshot")
        if raw.get("store") != store:
            log.warning(
                "snapshot file %s is of store %r, not %r: not used", path, raw.get("store"), store
            )
            return None
        pending = {k: AuditEvent(**e) for k, e in dict(raw.get("pending_rollbacks", {})).items()}
        return Snapshot(store, from_json(raw["image"]), float(raw["synced_at"]), pending)
    except (KeyError, TypeError, ValueError) as exc:
        log.error("snapshot file %s unreadable, not used: %s", path, exc)
        return None


def write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (temp file, fsync, rename, fsync the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class SnapshotWriter:
    """Writes `collect()` to `path` whenever it differs from what was written last."""

    def __init__(self, path: Path, collect: Callable[[], Snapshot], *, interval_s: float) -> None:
        self.path = path
        self._collect = collect
        self._interval = interval_s
        self._written: bytes | None = None
        self._failing = False

    async def run(self) -> None:
        while True:
            await self.flush()
            await asyncio.sleep(self._interval)

    async def flush(self) -> None:
        snapshot = self._collect()
        if not snapshot.image and not snapshot.pending_rollbacks and self._written is None:
            return  # nothing known yet: keep whatever an earlier run left
        data = snapshot.encode()
        if data == self._written:
            return
        try:
            await asyncio.to_thread(write, self.path, data)
        except OSError as exc:
            if not self._failing:
                log.error("snapshot file %s: cannot write: %s", self.path, exc)
            self._failing = True
            return
        self._failing = False
        self._written = data


__all__ = ["Snapshot", "SnapshotWriter", "default_state_dir", "read", "write"]
