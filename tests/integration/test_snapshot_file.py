"""The local snapshot file (gateway/control/snapshot.py): written atomically, read back as written,
and never used when it belongs to another store or cannot be read."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

from gateway.control.snapshot import Snapshot, SnapshotWriter, default_state_dir, read, write
from gateway.flagstore import AuditEvent

STORE = "127.0.0.1:6379 gw"
IMAGE = {
    "{gw}:flag:sentiment": {"doc": '{"key":"sentiment"}', "version": "3"},
    "{gw}:rollout:sentiment": {"state": '{"phase":"rolled_back"}', "rev": "2"},
}


def snapshot(**overrides: object) -> Snapshot:
    event = AuditEvent(ts=5.0, actor="guard", action="rollback", flag="sentiment", reason="sprt",
                       details={"n": 40, "k": 9})  # fmt: skip
    fields: dict[str, object] = {"store": STORE, "image": IMAGE, "synced_at": 12.5,
                                 "pending_rollbacks": {"sentiment": event}}  # fmt: skip
    return Snapshot(**{**fields, **overrides})  # type: ignore[arg-type]


def test_a_snapshot_reads_back_as_written(tmp_path: Path) -> None:
    path = tmp_path / "state" / "snapshot.json"  # the directory is made on the first write
    write(path, snapshot().encode())
    assert read(path, store=STORE) == snapshot()


def test_a_missing_unreadable_or_foreign_snapshot_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    assert read(path, store=STORE) is None
    path.write_text("{not json")
    assert read(path, store=STORE) is None
    path.write_text(json.dumps({"format": 1, "store": STORE, "synced_at": 1.0,
                                "image": {"k": {"f": 1}}}))  # fmt: skip
    assert read(path, store=STORE) is None  # a field that is not text
    write(path, snapshot().encode())
    assert read(path, store="10.0.0.9:6379 gw") is None
    assert read(path, store="127.0.0.1:6379 other") is None


def test_a_reader_sees_the_old_snapshot_or_the_new_one_never_part_of_one(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    big = {f"{{gw}}:flag:f{i}": {"doc": "x" * 2000, "version": str(i)} for i in range(200)}
    versions = [snapshot(image=big, synced_at=float(i)).encode() for i in range(2)]
    write(path, versions[0])
    done = threading.Event()
    seen: list[bytes] = []

    def reader() -> None:
        while not done.is_set():
            seen.append(path.read_bytes())

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(50):
        write(path, versions[i % 2])
    done.set()
    thread.join()
    assert seen and set(seen) <= set(versions)
    assert [p.name for p in tmp_path.iterdir()] == ["snapshot.json"]  # no temp file left


def test_the_writer_writes_changes_only(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    current = [snapshot(image={}, pending_rollbacks={})]
    writer = SnapshotWriter(path, lambda: current[0], interval_s=0.01)

    async def scenario() -> list[int]:
        inodes = []  # every write renames a new file over the old one
        await writer.flush()
        assert not path.exists()  # nothing known yet: an earlier run's file is kept
        current[0] = snapshot()
        await writer.flush()
        inodes.append(path.stat().st_ino)
        await writer.flush()  # unchanged: not written again
        inodes.append(path.stat().st_ino)
        current[0] = snapshot(pending_rollbacks={})
        await writer.flush()
        inodes.append(path.stat().st_ino)
        return inodes

    first, unchanged, changed = asyncio.run(scenario())
    assert first == unchanged != changed
    assert read(path, store=STORE) == snapshot(pending_rollbacks={})


def test_the_state_dir_follows_xdg() -> None:
    assert default_state_dir({"XDG_STATE_HOME": "/var/x"}) == Path("/var/x/canary-gateway")
    home = Path(os.path.expanduser("~"))
    assert default_state_dir({}) == home / ".local" / "state" / "canary-gateway"
