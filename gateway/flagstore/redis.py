"""The Redis flag store: flag documents, rollout state, guard counts and the audit, shared by
every gateway replica (DESIGN 7).

Every write is one Lua script (`redis_scripts.py`): compare-and-set, write, audit, announce, all
or nothing. Reads never touch the request path: the gateway reads its own snapshot, refreshed by
`on_change` from a pub/sub subscription and by a timed resync that repairs any lost message.
Redis errors are translated in one place (`RedisStore._reaching`) into `StoreUnavailable`.

Key layout. P is the `prefix` (default `gw`); the braces make it a Redis Cluster hash tag, so
all of one store's keys share a slot and the multi-key scripts also run on a cluster.

    key                        type     content
    {P}:flag:<key>             hash     doc          the operator's flag document (JSON)
                                        version      1 on create, +1 on every replace
                                        updated_at   unix seconds of the last write (event ts)
                                        updated_by   actor of the last write (a token's name)
    {P}:flags                  set      every flag key (what `load()` walks)
    {P}:routes                 hash     <key> -> the flag's route, for the overlap check
    {P}:rollout:<key>          hash     state        the rollout state (`Rollout.to_dict()` JSON)
                                        rev          +1 on every save (for operators to read)
    {P}:guard:<key>            hash     all of one flag's guard state (DESIGN 5); no hash =
                                        `GuardState()`. Fields:
                                        rollout      the rollout the state belongs to
                                        test         i, the current test of that rollout
                                        accepts      acceptances in that rollout
                                        n, k, llr    the current test's counts (llr: text
                                                     float, relative mode only)
                                        cn, ce       the step's canary requests and errors
                                        sn, se       the step's stable requests and errors
                                        step_from    the test the current step began with
                                        seq:<id>     last delta applied from replica <id>
                                                     in this step (at-most-once deltas)
    {P}:shadow:<key>:<shadow>:<metric>
                               hash     n, mean, m2  fleet-wide running stats of the paired
                                                     differences (text that is the exact double)
                                        tau          the mSPRT's default mixing sd, frozen
                                        p_min        running minimum of the always-valid p
                                        unmeasured   pairs left out (no finite value)
                                        metric       the metric (the key's last part)
    {P}:pairs:<key>:<shadow>   stream   line         one pair's JSON log line per entry;
                                                     MAXLEN ~ `pairs_maxlen`
    {P}:audit                  stream   ts, actor, action, flag, version_before, version_after
                                        ('' = none), reason, diff and details (JSON); newest
                                        last; MAXLEN ~ `audit_maxlen`
    {P}:changes                pub/sub  {"kind": "flag"|"rollout"|"guard", "key": "<key>"}
    {P}:meta                   hash     generation   the store's generation marker: written with
                                        created_at   the first flag, removed only by `gateway
                                                     store reset` (see `restore.py`); after a
                                                     restore also restored_by, restored_at

`put` and `delete` publish "flag", `save_rollout` "rollout", an `end_guard_test` or
`start_guard` that started a new test "guard", a restore or a reset "flag" with the key ''.
Deleting a flag removes its flag hash, index entry, rollout state and guard state in the same
script; its shadow stats and pair stream stay (as in the memory store).

URLs (all with short socket timeouts and no automatic retry, so an outage shows at once and a
write is never sent twice):

    redis://[user:password@]host:port/db      rediss://... for TLS (redis-py's `from_url`)
    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]
        Sentinel (default port 26379); the password is the master's. rediss+sentinel: TLS.
    redis+cluster://[user:password@]host:port   Redis Cluster (rediss+cluster: TLS)

Replication is asynchronous: a master that is failed over can have acknowledged writes its
replica never got. Give the masters `min-replicas-to-write 1` and a demoted master refuses
writes (NOREPLICAS, answered as "store unavailable; nothing was written") instead of acknowledging
writes that the failover then drops; tests/integration/test_store_failover.py runs Sentinel so.

Store loss (DESIGN 7): the store keeps an image of every hash under the prefix (`restore.py`)
and, when a load finds the flags gone together with the generation marker, writes that image
back, exactly once fleet-wide, before anything is served from the empty store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.core.flags import Flag, parse_flag
from gateway.core.paired import RunningStats
from gateway.core.schedule import Rollout
from gateway.core.totals import Totals
from gateway.errors import (
    ConflictError,
    FieldError,
    InvalidDocument,
    NotFoundError,
    PreconditionRequired,
    StoreUnavailable,
)
from gateway.flagstore import redis_scripts as lua
from gateway.flagstore import restore
from gateway.flagstore.base import (
    AuditEvent,
    ChangeKind,
    GuardDelta,
    GuardState,
    OnChange,
    StoredFlag,
    validated,
)
from gateway.flagstore.restore import Image

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 1.0
HEALTH_CHECK_INTERVAL_S = 10.0  # a PING before a command on a connection idle this long
POLL_S = 1.0  # how long one pub/sub read waits before checking again
BACKOFF_S = (0.1, 1.0)  # first and longest wait between reconnection attempts
AUDIT_PAGE = 200
# Redis cannot be reached, or cannot take writes now (a replica after a failover).
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)
_CHANGE_KINDS: frozenset[str] = frozenset({"flag", "rollout", "guard"})


@dataclass(frozen=True, slots=True)
class Keys:
    """Every key and the channel of one store (the layout in the module docstring)."""

    prefix: str

    def __post_init__(self) -> None:
        if not self.prefix or "{" in self.prefix or "}" in self.prefix:
            raise ValueError(f"Redis key prefix must be non-empty, without braces: {self.prefix!r}")

    def flag(self, key: str) -> str:
        return f"{{{self.prefix}}}:flag:{key}"

    def rollout(self, key: str) -> str:
        return f"{{{self.prefix}}}:rollout:{key}"

    def guard(self, key: str) -> str:
        return f"{{{self.prefix}}}:guard:{key}"

    def shadow(self, key: str, shadow: str, metric: str) -> str:
        # flag keys and variant names have no ':', so the metric is everything after the 4th
        return f"{{{self.prefix}}}:shadow:{key}:{shadow}:{metric}"

    def pairs(self, key: str, shadow: str) -> str:
        return f"{{{self.prefix}}}:pairs:{key}:{shadow}"

    @property
    def index(self) -> str:
        return f"{{{self.prefix}}}:flags"

    @property
    def meta(self) -> str:
        return f"{{{self.prefix}}}:meta"

    @property
    def pattern(self) -> str:
        """A SCAN pattern for every key of this store (braces are literal in Redis globs)."""
        return f"{{{self.prefix}}}:*"

    @property
    def routes(self) -> str:
        return f"{{{self.prefix}}}:routes"

    @property
    def audit(self) -> str:
        return f"{{{self.prefix}}}:audit"

    @property
    def channel(self) -> str:
        return f"{{{self.prefix}}}:changes"


class RedisStore:
    """The flag store shared by every replica (see the module docstring for the key layout)."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "gw",
        resync_interval_s: float = 5.0,
        audit_maxlen: int = 10_000,
        pairs_maxlen: int = 10_000,
        replica: str | None = None,
    ) -> None:
        self._keys = Keys(prefix)
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        # The image of the store (restore.py) and who to tell when this replica restored it.
        self._image: Image = {}
        self.on_restore: Callable[[], None] | None = None
        self._where = describe(url)
        self._client = connect(url)
        self._resync_interval_s = resync_interval_s
        self._audit_maxlen = str(audit_maxlen)
        self._pairs_maxlen = str(pairs_maxlen)
        self._healthy = True
        self._on_change: OnChange | None = None
        self._pubsub: PubSub | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: set[tuple[str, str]] = set()  # invalid documents already logged
        # Flags whose stored document cannot be read (key -> why), as of the last load: the
        # gateway keeps serving what it had for them rather than dropping their routes.
        self.unreadable: dict[str, str] = {}
        register = self._client.register_script
        self._put, self._delete = register(lua.PUT), register(lua.DELETE)
        self._save_rollout = register(lua.SAVE_ROLLOUT)
        self._guard_state = register(lua.GUARD_STATE)
        self._add_guard = register(lua.ADD_GUARD_DELTA)
        self._end_guard_test = register(lua.END_GUARD_TEST)
        self._start_guard = register(lua.START_GUARD)
        self._merge_shadow = register(lua.MERGE_SHADOW_STATS)
        self._restore, self._reset = register(restore.RESTORE), register(restore.RESET)

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def identity(self) -> str:
        """Which store this is (where and prefix), for the snapshot file; no password."""
        return f"{self._where} {self._keys.prefix}"

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self, on_change: OnChange) -> None:
        # Subscribe before loading, so no change falls between the load and the subscription.
        self._pubsub = await self._subscribe()
        try:
            await self.load()
            await self._dump()
        except StoreUnavailable:
            await self._pubsub.aclose()
            self._pubsub = None
            raise
        self._start(on_change)

    def open_later(self, on_change: OnChange) -> None:
        """For a replica that starts while Redis is away: reconnect in the background and call
        `on_change("resync", "")` once Redis answers (then as `open()` would)."""
        self._healthy = False
        self._start(on_change)

    def _start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(), name="flagstore-subscription"),
            loop.create_task(self._resync(), name="flagstore-resync"),
        ]

    async def close(self) -> None:
        self._on_change = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            await _stop(task)
        self._tasks.clear()
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None
        await self._client.aclose()

    # --- flags ------------------------------------------------------------------------------

    async def load(self) -> list[StoredFlag]:
        """Every flag; a store found lost (no flags, no marker) is first restored from the
        image, so an emptied Redis is never what the replicas serve."""
        keys, rows, marked = await self._read_flags()
        if not keys and not marked and restore.flag_keys(self._image, self._keys.flag("")):
            await self.restore()
            keys, rows, marked = await self._read_flags()
        if keys and not marked:
            await self._mark()  # the first flag, or a store from before the marker existed
        if marked:
            self._forget_deleted(set(keys))
        self.unreadable = {}
        stored = (self._stored(key, *row) for key, row in zip(keys, rows, strict=True))
        return [entry for entry in stored if entry is not None]

    async def _read_flags(self) -> tuple[list[str], list[list[str | None]], bool]:
        async with self._reaching(writing=False):
            pipe = self._client.pipeline(transaction=False)
            pipe.smembers(self._keys.index)
            pipe.exists(self._keys.meta)
            members, marked = await pipe.execute()
            keys: list[str] = sorted(cast(set[str], members))
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(self._keys.flag(key), "doc", "version")
            rows: list[list[str | None]] = await pipe.execute() if keys else []
        for key, (doc, version) in zip(keys, rows, strict=True):
            if doc is not None and version is not None:
                self._image.setdefault(self._keys.flag(key), {}).update(doc=doc, version=version)
        return keys, rows, bool(marked)

    async def get(self, key: str) -> StoredFlag | None:
        async with self._reaching(writing=False):
            row = cast(
                list[str | None], await self._client.hmget(self._keys.flag(key), "doc", "version")
            )
        doc, version = row
        if doc is not None and version is not None:
            self._image.setdefault(self._keys.flag(key), {}).update(doc=doc, version=version)
        return self._stored(key, *row)

    async def put(
        self, flag: Flag, document: dict[str, Any], *, if_match: int | None, event: AuditEvent
    ) -> StoredFlag:
        flag = validated(flag, document)
        keys = [self._keys.flag(flag.key), self._keys.index, self._keys.audit, self._keys.routes]
        args = [flag.key, _optional(if_match), json.dumps(document, separators=(",", ":"))]
        args += [repr(event.ts), event.actor, self._audit_maxlen]
        args += [*self._announcement("flag", flag.key), _route(flag)]
        args += _audit_fields(event)
        async with self._reaching(writing=True):
            status, value = await self._put(keys=keys, args=args)
        if status == "overlap":
            message = f"overlaps the route of flag {value!r} ({flag.route.path_prefix!r})"
            raise InvalidDocument([FieldError("route", message)])
        if status == "exists":
            raise PreconditionRequired(
                f"flag {flag.key!r} exists (version {value}): send If-Match with its version"
            )
        if status == "conflict":
            raise ConflictError(flag.key, if_match, _version(value))
        self._image[self._keys.flag(flag.key)] = {
            "doc": args[2],
            "version": str(value),
            "updated_at": repr(event.ts),
            "updated_by": event.actor,
        }
        with contextlib.suppress(StoreUnavailable):  # written: the next load marks it anyway
            await self._mark()
        return StoredFlag(flag, document, int(value))

    async def delete(self, key: str, *, if_match: int, event: AuditEvent) -> None:
        k = self._keys
        keys = [k.flag(key), k.index, k.rollout(key), k.guard(key), k.audit, k.routes]
        args = [key, _optional(if_match), self._audit_maxlen, *self._announcement("flag", key)]
        async with self._reaching(writing=True):
            status, value = await self._delete(keys=keys, args=[*args, *_audit_fields(event)])
        if status == "missing":
            raise NotFoundError(f"no flag {key!r}")
        if status == "exists":
            raise PreconditionRequired(
                f"flag {key!r} exists (version {value}): send If-Match with its version"
            )
        if status == "conflict":
            raise ConflictError(key, if_match, _version(value))
        restore.without(self._image, [k.flag(key), k.rollout(key), k.guard(key)])

    # --- audit ------------------------------------------------------------------------------

    async def audit(self, *, flag: str | None = None, limit: int = 100) -> list[AuditEvent]:
        events: list[AuditEvent] = []
        page = limit if flag is None else max(limit, AUDIT_PAGE)
        newest = "+"
        while len(events) < limit:
            async with self._reaching(writing=False):
                batch = cast(
                    list[tuple[str, dict[str, str]]],
                    await self._client.xrevrange(self._keys.audit, newest, "-", count=page),
                )
            decoded = (_audit_event(entry_id, fields) for entry_id, fields in batch)
            events += [e for e in decoded if e is not None and flag in (None, e.flag)]
            if len(batch) < page:
                break
            newest = f"({batch[-1][0]}"  # exclusive: continue below the oldest one seen
        return events[: max(limit, 0)]

    async def record(self, event: AuditEvent) -> None:
        fields = _audit_fields(event, with_versions=True)
        async with self._reaching(writing=True):
            await self._client.xadd(
                self._keys.audit,
                dict(zip(fields[::2], fields[1::2], strict=True)),
                maxlen=int(self._audit_maxlen),
                approximate=True,
            )

    # --- rollout state ----------------------------------------------------------------------

    async def rollout(self, key: str) -> Rollout | None:
        async with self._reaching(writing=False):
            raw = cast(str | None, await self._client.hget(self._keys.rollout(key), "state"))
        if raw is None:
            return None  # never taken into the image: an emptied store must not erase it
        self._image.setdefault(self._keys.rollout(key), {})["state"] = raw
        return _rollout(key, raw)

    async def save_rollout(
        self,
        key: str,
        rollout: Rollout,
        *,
        expected: Rollout | None,
        event: AuditEvent | None = None,
    ) -> bool:
        # Compared here as the memory store compares (`Rollout` equality, so 100 and 100.0 or a
        # field added since the state was written do not matter), then the script checks that
        # the stored bytes are still the ones compared.
        async with self._reaching(writing=True):
            raw = cast(str | None, await self._client.hget(self._keys.rollout(key), "state"))
        stored = None if raw is None else _rollout(key, raw)
        if (raw is None) != (expected is None) or stored != expected:
            return False
        args: list[str] = [raw or "", json.dumps(rollout.to_dict(), separators=(",", ":"))]
        args += [self._audit_maxlen, *self._announcement("rollout", key)]
        args += _audit_fields(event, with_versions=True) if event is not None else []
        async with self._reaching(writing=True):
            status, rev = await self._save_rollout(
                keys=[self._keys.rollout(key), self._keys.audit], args=args
            )
        imaged = self._image.get(self._keys.rollout(key))
        if status == "ok" and (expected is not None or imaged is None):
            # A first state written into a store that came back empty must not replace the
            # imaged one (a rolled-back canary) before the restore puts that back.
            self._image[self._keys.rollout(key)] = {"state": args[1], "rev": str(rev)}
        return bool(status == "ok")

    # --- guard counts -----------------------------------------------------------------------

    async def guard_state(self, key: str) -> GuardState:
        async with self._reaching(writing=False):
            reply = await self._guard_state(keys=[self._keys.guard(key)], args=[])
        return _guard_state(reply)

    async def add_guard_delta(self, key: str, delta: GuardDelta) -> GuardState:
        d = delta
        args: list[str | int] = [d.rollout, d.test, d.replica, d.seq, d.n, d.k, repr(d.llr)]
        args += [d.canary_requests, d.canary_errors, d.stable_requests, d.stable_errors]
        async with self._reaching(writing=True):
            reply = await self._add_guard(keys=[self._keys.guard(key)], args=args)
        return self._imaged_guard(key, _guard_state(reply))

    async def end_guard_test(
        self, key: str, *, rollout: str, test: int, accepted: bool, new_step: bool
    ) -> GuardState:
        args = [rollout, str(test), "1" if accepted else "0", "1" if new_step else "0"]
        args += self._announcement("guard", key)
        async with self._reaching(writing=True):
            reply = await self._end_guard_test(keys=[self._keys.guard(key)], args=args)
        return self._imaged_guard(key, _guard_state(reply))

    async def start_guard(self, key: str, *, rollout: str) -> GuardState:
        args = [rollout, *self._announcement("guard", key)]
        async with self._reaching(writing=True):
            reply = await self._start_guard(keys=[self._keys.guard(key)], args=args)
        return self._imaged_guard(key, _guard_state(reply))

    def _imaged_guard(self, key: str, state: GuardState) -> GuardState:
        # Within a rollout the state only moves forward (a later test, or more counted within
        # one); anything behind the image, or an empty state where the image has a rollout,
        # comes from a store that lost it, which the restore is about to repair. Another
        # rollout's state is a newer rollout's: it replaces the image.
        fields = self._image.get(self._keys.guard(key), {})
        imaged_rollout = fields.get("rollout", "")
        if imaged_rollout and state.rollout in ("", imaged_rollout):
            imaged = (
                int(fields.get("test", "1")),
                int(fields.get("cn", "0")) + int(fields.get("sn", "0")),
            )
            if (state.test, state.canary_requests + state.stable_requests) < imaged:
                return state
        self._image[self._keys.guard(key)] = {**fields, **_guard_fields(state)}
        return state

    # --- shadow statistics ------------------------------------------------------------------

    async def merge_shadow_stats(
        self,
        key: str,
        shadow: str,
        metric: str,
        pending: RunningStats,
        lines: list[str],
        *,
        unmeasured: int = 0,
        p_look: float = 1.0,
    ) -> Totals:
        keys = [self._keys.shadow(key, shadow, metric), self._keys.pairs(key, shadow)]
        numbers = [str(pending.n), repr(pending.mean), repr(pending.m2), str(unmeasured)]
        args = [*numbers, repr(p_look), metric, self._pairs_maxlen, *lines]
        async with self._reaching(writing=True):
            n, mean, m2, tau, p_min, lost = await self._merge_shadow(keys=keys, args=args)
        imaged = self._image.get(keys[0], {})
        if int(n) > 0 and int(n) >= int(imaged.get("n", "0")):  # behind the image: store lost
            fields = {"n": n, "mean": mean, "m2": m2, "tau": tau, "p_min": p_min}
            self._image[keys[0]] = {**imaged, **fields, "unmeasured": lost, "metric": metric}
        stats = RunningStats(int(n), float(mean), float(m2))
        return Totals(stats, float(tau) if tau else None, float(p_min), int(lost))

    async def shadow_pairs(self, key: str, shadow: str) -> list[str] | None:
        async with self._reaching(writing=False):
            entries = cast(
                list[tuple[str, dict[str, str]]],
                await self._client.xrange(self._keys.pairs(key, shadow)),
            )
        return [fields["line"] for _, fields in entries]

    # --- store loss (restore.py) --------------------------------------------------------------

    def image(self) -> Image:
        """A copy of this replica's image of the store (for the local snapshot file)."""
        return restore.copy(self._image)

    def adopt(self, image: Image) -> None:
        """Start from an image read back from the snapshot file (before `open`)."""
        if not self._image:
            self._image = restore.copy(image)

    def imaged_flags(self) -> list[StoredFlag]:
        """The flags as the image holds them: what this replica last knew of the store."""
        rows = ((key, self._image.get(self._keys.flag(key), {})) for key in self._imaged_keys())
        stored = (self._stored(key, f.get("doc"), f.get("version")) for key, f in rows)
        return [entry for entry in stored if entry is not None]

    def imaged_rollouts(self) -> dict[str, Rollout]:
        found = {}
        for key in self._imaged_keys():
            raw = self._image.get(self._keys.rollout(key), {}).get("state")
            rollout = None if raw is None else _rollout(key, raw)
            if rollout is not None:
                found[key] = rollout
        return found

    def _imaged_keys(self) -> list[str]:
        return restore.flag_keys(self._image, self._keys.flag(""))

    async def restore(self) -> bool:
        """Write the image back if the store has no marker (compare-and-set on it): True when
        this call restored, False when the marker was there (another replica was first)."""
        hash_keys, payload, flags = restore.restore_arguments(self._image, self._keys.flag(""))
        event = AuditEvent(
            ts=time.time(),
            actor=self.replica,
            action="store_restored",
            flag="",
            reason="the store came back without its flags and without its generation marker",
            details={"replica": self.replica, "flags": flags, "keys": len(hash_keys)},
        )
        k = self._keys
        args = [self.replica, repr(event.ts), restore.new_generation(), self._audit_maxlen]
        args += [*self._announcement("flag", ""), payload]
        args += _audit_fields(event, with_versions=True)
        async with self._reaching(writing=True):
            done = await self._restore(keys=[k.meta, k.index, k.audit, *hash_keys], args=args)
        if done:
            log.warning(
                "flag store: Redis at %s had lost the store; restored %d flag(s) and %d key(s) "
                "from this replica (%s)",
                self._where,
                len(flags),
                len(hash_keys),
                self.replica,
            )
            if self.on_restore is not None:
                self.on_restore()
        return bool(done)

    async def reset(self, *, actor: str, reason: str) -> int:
        """Delete every key of this store and start a new generation, audited: the deliberate
        wipe (`gateway store reset`). Returns how many keys were deleted."""
        async with self._reaching(writing=True):
            found = [key async for key in self._client.scan_iter(match=self._keys.pattern)]
        k = self._keys
        doomed = sorted({key for key in found if key not in (k.meta, k.audit)})
        event = AuditEvent(
            ts=time.time(),
            actor=actor,
            action="store_reset",
            flag="",
            reason=reason,
            details={"keys": len(doomed)},
        )
        args = [restore.new_generation(), repr(event.ts), self._audit_maxlen]
        args += [*self._announcement("flag", ""), *_audit_fields(event, with_versions=True)]
        async with self._reaching(writing=True):
            deleted = await self._reset(keys=[k.meta, k.audit, *doomed], args=args)
        self._image = {}
        return int(deleted)

    async def _mark(self) -> None:
        async with self._reaching(writing=True):
            generation = restore.marker_fields()
            if await self._client.hsetnx(self._keys.meta, "generation", generation["generation"]):
                await self._client.hset(self._keys.meta, "created_at", generation["created_at"])

    def _forget_deleted(self, present: set[str]) -> None:
        k = self._keys
        for key in self._imaged_keys():
            if key not in present:
                restore.without(self._image, [k.flag(key), k.rollout(key), k.guard(key)])

    async def _dump(self) -> None:
        """Read every hash of the store into the image, unless the marker is gone (a store
        that lost its contents must not replace the image it is to be restored from)."""
        async with self._reaching(writing=False):
            found = self._client.scan_iter(match=self._keys.pattern, count=1000, _type="hash")
            keys = sorted({key async for key in found} - {self._keys.meta})
            pipe = self._client.pipeline(transaction=False)
            pipe.exists(self._keys.meta)
            for key in keys:
                pipe.hgetall(key)
            marked, *hashes = await pipe.execute()
        if marked:
            self._image = {key: h for key, h in zip(keys, hashes, strict=True) if h}

    # --- the one place Redis errors are translated ------------------------------------------

    @contextlib.asynccontextmanager
    async def _reaching(self, *, writing: bool) -> AsyncIterator[None]:
        try:
            yield
        except _UNREACHABLE as exc:
            await self._mark_down(exc)
            raise StoreUnavailable(self._unavailable(exc, writing=writing)) from exc
        except ResponseError as exc:
            # A master configured with min-replicas-to-write refuses writes it could not
            # replicate (a demoted master during a failover): refused, so nothing was written.
            if "NOREPLICAS" not in str(exc):
                raise
            await self._mark_down(exc)
            raise StoreUnavailable(self._unavailable(exc, writing=writing)) from exc
        await self._mark_up()

    def _unavailable(self, exc: BaseException, *, writing: bool) -> str:
        message = f"flag store unavailable (Redis at {self._where}: {_reason(exc)})"
        if not writing:
            return message
        if isinstance(exc, RedisTimeoutError):
            # The command may have run before the answer was lost: say so rather than guess.
            return f"{message}; the write may or may not have been applied: re-read and retry"
        return f"{message}; nothing was written"

    async def _mark_down(self, exc: BaseException) -> None:
        if self._healthy:
            log.warning("flag store: Redis at %s unreachable (%s)", self._where, _reason(exc))
            self._healthy = False
            await self._drop_idle_connections()

    async def _mark_up(self) -> None:
        if not self._healthy:
            log.info("flag store: Redis at %s reachable again", self._where)
            self._healthy = True
            await self._drop_idle_connections()

    async def _drop_idle_connections(self) -> None:
        # Pooled connections opened before an outage look fine until a command fails on them
        # (redis-py does not notice the server closed them), so each would fail one more
        # command after Redis is back. Drop them when the outage is noticed and when it ends.
        pool = getattr(self._client, "connection_pool", None)  # RedisCluster: one per node
        if pool is not None:
            with contextlib.suppress(*_UNREACHABLE):
                await pool.disconnect(inuse_connections=False)

    # --- change messages and the resync timer -----------------------------------------------

    def _announcement(self, kind: ChangeKind, key: str) -> list[str]:
        """The channel and the message a script publishes."""
        return [self._keys.channel, json.dumps({"kind": kind, "key": key})]

    async def _subscribe(self) -> PubSub:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            async with self._reaching(writing=False):
                await pubsub.subscribe(self._keys.channel)
        except StoreUnavailable:
            await pubsub.aclose()
            raise
        return pubsub

    async def _listen(self) -> None:
        """Deliver change messages; on a lost connection resubscribe with backoff and resync."""
        while True:
            if self._pubsub is not None:  # None when the replica started while Redis was away
                with contextlib.suppress(StoreUnavailable):
                    await self._deliver_from(self._pubsub)
                await self._pubsub.aclose()
            self._pubsub = await self._resubscribe()
            # Messages published while we were away are gone: reload everything.
            await self._notify("resync", "")

    async def _deliver_from(self, pubsub: PubSub) -> None:
        while True:
            async with self._reaching(writing=False):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_S)
            change = _change(message)
            if change is not None:
                await self._notify(*change)

    async def _resubscribe(self) -> PubSub:
        delay = BACKOFF_S[0]
        while True:
            await asyncio.sleep(delay)
            with contextlib.suppress(StoreUnavailable):
                return await self._subscribe()
            delay = min(delay * 2, BACKOFF_S[1])

    async def _resync(self) -> None:
        """Every interval: PING (so health comes back without traffic), then a full resync."""
        while True:
            await asyncio.sleep(self._resync_interval_s)
            try:
                async with self._reaching(writing=False):
                    await self._client.ping()
                await self._dump()
            except StoreUnavailable:
                continue
            await self._notify("resync", "")

    async def _notify(self, kind: ChangeKind, key: str) -> None:
        on_change = self._on_change
        if on_change is None:
            return
        try:
            await on_change(kind, key)
        except StoreUnavailable:
            pass  # the outage is already reported by _mark_down; the next resync repairs it
        except Exception:  # the gateway's handler failing must not end the subscription
            log.exception("flag store: on_change(%r, %r) failed", kind, key)

    # --- decoding ---------------------------------------------------------------------------

    def _stored(self, key: str, doc: str | None, version: str | None, /) -> StoredFlag | None:
        if doc is None or version is None:
            return None
        try:
            document = json.loads(doc)
            flag = parse_flag(document, path=key)
            if flag.key != key:
                raise ValueError(f"the document's key is {flag.key!r}")
            return StoredFlag(flag, document, int(version))
        except (ValueError, InvalidDocument) as exc:
            self.unreadable[key] = f"version {version}: {exc}"
            if (key, version) not in self._reported:  # once per version, not every resync
                self._reported.add((key, version))
                log.error("flag store: skipping flag %r version %s: %s", key, version, exc)
            return None


async def _stop(task: asyncio.Task[None]) -> None:
    # Cancel until done: Python 3.11's asyncio.wait_for, which redis-py wraps around every
    # send, swallows a cancellation that arrives just as the send completes.
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled() and task.exception() is not None:
        log.error("flag store: %s had failed", task.get_name(), exc_info=task.exception())


# --- connections ----------------------------------------------------------------------------


def connect(url: str) -> aioredis.Redis:
    """A client for `url` (see the module docstring); connects lazily, on first use."""
    options: dict[str, Any] = {
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        # No automatic retry: a script whose answer was lost must not run twice.
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
    }
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return aioredis.from_url(url, **options)
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return _sentinel_master(url, options)
    if scheme in ("redis+cluster", "rediss+cluster"):
        plain = url.replace("+cluster", "", 1)
        # RedisCluster answers the same commands, scripts and pub/sub as Redis (pub/sub in
        # asyncio since redis-py 8.0, hence the floor in pyproject.toml). Every key of a store
        # shares one hash tag, so each multi-key script runs on one node.
        return cast(aioredis.Redis, RedisCluster.from_url(plain, **options))
    raise ValueError(
        f"unsupported Redis URL scheme {scheme!r}: use redis://, rediss://, "
        "redis+sentinel://host:port[,host:port]/service[/db] or redis+cluster://host:port"
    )


def _sentinel_master(url: str, options: dict[str, Any]) -> aioredis.Redis:
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = [_host_port(node, default_port=26379) for node in hosts.split(",") if node]
    path = [p for p in parts.path.split("/") if p]
    if not nodes or not 1 <= len(path) <= 2:
        raise ValueError(f"expected redis+sentinel://host:port[,...]/service[/db], got {url!r}")
    socket_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel = Sentinel(nodes, sentinel_kwargs=socket_options)
    master: aioredis.Redis = sentinel.master_for(
        unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(user) or None,
        password=unquote(password) or None,
        ssl=parts.scheme.startswith("rediss"),
        **options,
    )
    return master


def _host_port(node: str, *, default_port: int) -> tuple[str, int]:
    host, _, port = node.rpartition(":") if ":" in node else (node, "", "")
    return host.strip("[]"), int(port) if port else default_port


def describe(url: str) -> str:
    """host:port (or the sentinel list) for messages; never the password."""
    parts = urlsplit(url)
    where = parts.netloc.rpartition("@")[2]
    if parts.scheme == "unix":
        return parts.path
    if "sentinel" in parts.scheme:
        return f"sentinel {where} service {parts.path.strip('/')}"
    return where if ":" in where else f"{where}:6379"


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# --- encoding -------------------------------------------------------------------------------


def _route(flag: Flag) -> str:
    """The route as the put script compares it (see `redis_scripts._ROUTES`)."""
    route = flag.route
    entry = [route.path_prefix.rstrip("/"), route.host or "", sorted(route.methods or [])]
    return json.dumps(entry, separators=(",", ":"))


def _optional(value: int | None) -> str:
    return "" if value is None else str(value)


def _version(value: str) -> int | None:
    return int(value) if value else None


def _audit_fields(event: AuditEvent, *, with_versions: bool = False) -> list[str]:
    """`event` as flat stream fields; versions only when no script fills them in."""
    fields = ["ts", repr(event.ts), "actor", event.actor, "action", event.action]
    fields += ["flag", event.flag, "reason", event.reason]
    fields += ["diff", json.dumps(event.diff), "details", json.dumps(event.details)]
    if with_versions:
        before, after = _optional(event.version_before), _optional(event.version_after)
        fields += ["version_before", before, "version_after", after]
    return fields


def _audit_event(entry_id: str, fields: dict[str, str]) -> AuditEvent | None:
    try:
        return AuditEvent(
            ts=float(fields["ts"]),
            actor=fields["actor"],
            action=fields["action"],
            flag=fields["flag"],
            version_before=_version(fields.get("version_before", "")),
            version_after=_version(fields.get("version_after", "")),
            diff=json.loads(fields.get("diff", "[]")),
            reason=fields.get("reason", ""),
            details=json.loads(fields.get("details", "{}")),
        )
    except (KeyError, ValueError) as exc:
        log.error("flag store: skipping unreadable audit entry %s: %s", entry_id, exc)
        return None


def _guard_fields(state: GuardState) -> dict[str, str]:
    """The guard hash's fields (see the key layout) for `state`."""
    return {
        "rollout": state.rollout,
        "test": str(state.test),
        "accepts": str(state.accepts),
        "n": str(state.n),
        "k": str(state.k),
        "llr": repr(state.llr),
        "cn": str(state.canary_requests),
        "ce": str(state.canary_errors),
        "sn": str(state.stable_requests),
        "se": str(state.stable_errors),
        "step_from": str(state.step_from),
    }


def _guard_state(reply: list[str]) -> GuardState:
    rollout, test, accepts, n, k, llr, cn, ce, sn, se, step_from = reply
    return GuardState(
        rollout=rollout,
        test=int(test),
        accepts=int(accepts),
        n=int(n),
        k=int(k),
        llr=float(llr),
        canary_requests=int(cn),
        canary_errors=int(ce),
        stable_requests=int(sn),
        stable_errors=int(se),
        step_from=int(step_from),
    )


def _rollout(key: str, raw: str) -> Rollout | None:
    try:
        return Rollout.from_dict(json.loads(raw))
    except ValueError as exc:
        log.error("flag store: unreadable rollout state of flag %r: %s", key, exc)
        return None


def _change(message: dict[str, Any] | None) -> tuple[ChangeKind, str] | None:
    if message is None or message.get("type") != "message":
        return None
    try:
        data = json.loads(message["data"])
        kind, key = data["kind"], data["key"]
    except (ValueError, KeyError, TypeError):
        log.warning("flag store: ignoring malformed change message %r", message.get("data"))
        return None
    if kind not in _CHANGE_KINDS or not isinstance(key, str):
        log.warning("flag store: ignoring change message %r", data)
        return None
    return cast(ChangeKind, kind), key


__all__ = ["Keys", "RedisStore", "connect", "describe"]
