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
    {P}:rollout:<key>          hash     state        the rollout state (`Rollout.to_dict()` JSON)
                                        rev          +1 on every save (for operators to read)
    {P}:guard:<key>            hash     n, k, epoch  fleet-wide guard counts; no hash = 0, 0, 0
    {P}:shadow:<key>:<shadow>  hash     n, mean, m2  fleet-wide running stats of the paired
                                                     differences (text that is the exact double)
    {P}:pairs:<key>:<shadow>   stream   line         one pair's JSON log line per entry;
                                                     MAXLEN ~ `pairs_maxlen`
    {P}:audit                  stream   ts, actor, action, flag, version_before, version_after
                                        ('' = none), reason, diff and details (JSON); newest
                                        last; MAXLEN ~ `audit_maxlen`
    {P}:changes                pub/sub  {"kind": "flag"|"rollout"|"guard", "key": "<key>"}

`put` and `delete` publish "flag", `save_rollout` "rollout", a `reset_guard` that started a new
epoch "guard". Deleting a flag removes its flag hash, index entry, rollout state and guard counts
in the same script; its shadow stats and pair stream stay (as in the memory store).

URLs (all with short socket timeouts and no automatic retry, so an outage shows at once and a
write is never sent twice):

    redis://[user:password@]host:port/db      rediss://... for TLS (redis-py's `from_url`)
    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]
        Sentinel (default port 26379); the password is the master's. rediss+sentinel: TLS.
    redis+cluster://[user:password@]host:port   Redis Cluster (rediss+cluster: TLS)

Only the plain form is covered by the tests; the other two are built exactly as redis-py
documents them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
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
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.core.flags import Flag, parse_flag
from gateway.core.paired import RunningStats
from gateway.core.schedule import Rollout
from gateway.errors import (
    ConflictError,
    InvalidDocument,
    NotFoundError,
    PreconditionRequired,
    StoreUnavailable,
)
from gateway.flagstore import redis_scripts as lua
from gateway.flagstore.base import AuditEvent, ChangeKind, GuardCounts, OnChange, StoredFlag

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

    def shadow(self, key: str, shadow: str) -> str:
        return f"{{{self.prefix}}}:shadow:{key}:{shadow}"

    def pairs(self, key: str, shadow: str) -> str:
        return f"{{{self.prefix}}}:pairs:{key}:{shadow}"

    @property
    def index(self) -> str:
        return f"{{{self.prefix}}}:flags"

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
    ) -> None:
        self._keys = Keys(prefix)
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
        register = self._client.register_script
        self._put, self._delete = register(lua.PUT), register(lua.DELETE)
        self._save_rollout = register(lua.SAVE_ROLLOUT)
        self._add_guard = register(lua.ADD_GUARD_COUNTS)
        self._reset_guard = register(lua.RESET_GUARD)
        self._merge_shadow = register(lua.MERGE_SHADOW_STATS)

    @property
    def healthy(self) -> bool:
        return self._healthy

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self, on_change: OnChange) -> None:
        # Subscribe before loading, so no change falls between the load and the subscription.
        self._pubsub = await self._subscribe()
        try:
            await self.load()
        except StoreUnavailable:
            await self._pubsub.aclose()
            raise
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
        async with self._reaching(writing=False):
            keys: list[str] = sorted(cast(set[str], await self._client.smembers(self._keys.index)))
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(self._keys.flag(key), "doc", "version")
            rows: list[list[str | None]] = await pipe.execute() if keys else []
        stored = (self._stored(key, *row) for key, row in zip(keys, rows, strict=True))
        return [entry for entry in stored if entry is not None]

    async def get(self, key: str) -> StoredFlag | None:
        async with self._reaching(writing=False):
            row = cast(
                list[str | None], await self._client.hmget(self._keys.flag(key), "doc", "version")
            )
        return self._stored(key, *row)

    async def put(
        self, flag: Flag, document: dict[str, Any], *, if_match: int | None, event: AuditEvent
    ) -> StoredFlag:
        keys = [self._keys.flag(flag.key), self._keys.index, self._keys.audit]
        args = [flag.key, _optional(if_match), json.dumps(document, separators=(",", ":"))]
        args += [repr(event.ts), event.actor, self._audit_maxlen]
        args += [*self._announcement("flag", flag.key), *_audit_fields(event)]
        async with self._reaching(writing=True):
            status, value = await self._put(keys=keys, args=args)
        if status == "exists":
            raise PreconditionRequired(
                f"flag {flag.key!r} exists (version {value}): send If-Match with its version"
            )
        if status == "conflict":
            raise ConflictError(flag.key, if_match, _version(value))
        return StoredFlag(flag, document, int(value))

    async def delete(self, key: str, *, if_match: int, event: AuditEvent) -> None:
        k = self._keys
        keys = [k.flag(key), k.index, k.rollout(key), k.guard(key), k.audit]
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
        return None if raw is None else _rollout(key, raw)

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
            status, _ = await self._save_rollout(
                keys=[self._keys.rollout(key), self._keys.audit], args=args
            )
        return bool(status == "ok")

    # --- guard counts -----------------------------------------------------------------------

    async def add_guard_counts(self, key: str, n: int, k: int, *, epoch: int) -> GuardCounts:
        async with self._reaching(writing=True):
            counts = await self._add_guard(keys=[self._keys.guard(key)], args=[epoch, n, k])
        return GuardCounts(*(int(c) for c in counts))

    async def reset_guard(self, key: str, *, epoch: int) -> GuardCounts:
        args = [str(epoch), *self._announcement("guard", key)]
        async with self._reaching(writing=True):
            counts = await self._reset_guard(keys=[self._keys.guard(key)], args=args)
        return GuardCounts(*(int(c) for c in counts))

    # --- shadow statistics ------------------------------------------------------------------

    async def merge_shadow_stats(
        self, key: str, shadow: str, pending: RunningStats, lines: list[str]
    ) -> RunningStats:
        keys = [self._keys.shadow(key, shadow), self._keys.pairs(key, shadow)]
        args = [str(pending.n), repr(pending.mean), repr(pending.m2), self._pairs_maxlen, *lines]
        async with self._reaching(writing=True):
            n, mean, m2 = await self._merge_shadow(keys=keys, args=args)
        return RunningStats(int(n), float(mean), float(m2))

    # --- the one place Redis errors are translated ------------------------------------------

    @contextlib.asynccontextmanager
    async def _reaching(self, *, writing: bool) -> AsyncIterator[None]:
        try:
            yield
        except _UNREACHABLE as exc:
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
            assert self._pubsub is not None
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
        # RedisCluster answers the same commands, scripts and pub/sub as Redis.
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
    return sentinel.master_for(
        unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(user) or None,
        password=unquote(password) or None,
        ssl=parts.scheme.startswith("rediss"),
        **options,
    )


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
