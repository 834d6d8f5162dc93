"""Wiring: `create_app(settings)` builds a `Gateway` with its data-plane and admin apps.

No module-level state: the upstream clients, the flag store and the background tasks belong to
the Gateway and live between `start()` and `stop()` (or the data app's ASGI lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from gateway.admin.console import console_routes
from gateway.admin.health import health_routes
from gateway.admin.ports import Readiness
from gateway.admin.routes import admin_routes
from gateway.build import client_choice, package_version, server_choice
from gateway.control.controller import Controller
from gateway.control.guard import CanaryGuard
from gateway.control.runtime import FlagRuntime, Router, carry_over, compile_flag
from gateway.control.shadow import Mirror
from gateway.control.snapshot import Snapshot, SnapshotWriter, default_state_dir
from gateway.control.snapshot import read as read_snapshot
from gateway.control.sync import CounterSync
from gateway.core.flags import Flag
from gateway.dataplane.proxy import Message, Proxy, Receive, Scope, Send
from gateway.dataplane.upstream import UpstreamPool
from gateway.errors import PreconditionRequired, StoreUnavailable
from gateway.flagstore import AuditEvent, FlagStore, MemoryStore, StoredFlag, read_flags_file
from gateway.flagstore.base import ChangeKind
from gateway.metrics import Metrics
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.flagstore.redis import RedisStore

log = logging.getLogger(__name__)


class Gateway:
    """One replica: snapshot, store, controller, upstream clients and the two ASGI apps."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        store: FlagStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock  # rollout time: schedules, holds and audit stamps read it
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        server = server_choice(settings)
        self.metrics.build_info.labels(package_version(), server, client_choice(settings)).set(1)
        self.metrics.fast_path.labels("server", server).set(1)
        self.store: FlagStore = store or _make_store(settings)
        self.router = Router([])
        self.pool: UpstreamPool | None = None
        self.ready = False
        self.last_sync = 0.0
        self.mirror = Mirror(
            max_in_flight=settings.shadow.max_in_flight,
            mirror_max_body_bytes=settings.upstream.mirror_max_body_bytes,
            wait_for_primary_s=settings.upstream.read_timeout_s + 5.0,
        )
        self.proxy = Proxy(settings, lambda: self.router, self.mirror)
        self.controller = Controller(
            self.store,
            self.metrics,
            lambda: self.router,
            interval_s=settings.controller_interval_s,
            clock=clock,
        )
        self.counter_sync = CounterSync(
            self.store,
            self.metrics,
            lambda: self.router,
            self.mirror,
            interval_s=settings.store.flush_interval_s,
        )
        self.shared = _shared(self.store)
        self.snapshot: SnapshotWriter | None = None
        self._seed_pending = False  # started while Redis was away: seed once it answers
        if self.shared is not None:
            self.shared.on_restore = self.metrics.flag_store_restores.inc
            path = _snapshot_path(settings)
            if path is not None:
                self.snapshot = SnapshotWriter(
                    path, self._snapshot_now, interval_s=SNAPSHOT_INTERVAL_S
                )
        self.data_app = _WithLifespan(self.proxy, self)
        self.admin_app = Starlette(
            routes=health_routes(self) + admin_routes(self) + console_routes()
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._statistics_loading = False
        # Flags this replica could not apply (key -> why); it serves what it had for them.
        self.snapshot_problems: dict[str, str] = {}
        self._reported_problems: set[tuple[str, str]] = set()
        # Run once scipy is loaded (off the loop, after start-up): the server freezes the heap.
        self.after_preload: Callable[[], None] | None = None

    def new_guard(self, flag: Flag) -> CanaryGuard:
        return CanaryGuard(
            flag.key,
            flag.guard,
            on_reject=self.controller.on_guard_reject,
            on_accept=self.controller.on_guard_accept,
        )

    async def start(self) -> None:
        self.pool = UpstreamPool(self.settings.upstream)
        self.metrics.fast_path.labels("client", self.pool.client_impl).set(1)
        snapshot = await self._read_snapshot()
        try:
            await self.store.open(self.on_change)
        except StoreUnavailable as exc:
            if self.shared is None:
                raise
            self._start_offline(self.shared, snapshot, exc)
        else:
            async with self.controller.lock:  # the subscription may deliver a change already
                await self._seed_from_file()
                self.install(await self.store.load())
            await self.controller.tick()
            self.metrics.flag_store_up.set(1)
        self._tasks.append(asyncio.create_task(self.controller.run(), name="controller"))
        self._tasks.append(asyncio.create_task(self.counter_sync.run(), name="counter-sync"))
        if self.snapshot is not None:
            self._tasks.append(asyncio.create_task(self.snapshot.run(), name="snapshot-file"))
        self.ready = True

    async def _read_snapshot(self) -> Snapshot | None:
        """The snapshot file, adopted: the store's image and the rollbacks not yet written."""
        if self.snapshot is None or self.shared is None:
            return None
        snapshot = await asyncio.to_thread(
            read_snapshot, self.snapshot.path, store=self.shared.identity
        )
        if snapshot is not None:
            self.shared.adopt(snapshot.image)
            self.controller.adopt_unwritten_rollbacks(snapshot.pending_rollbacks)
            if snapshot.pending_rollbacks:
                log.warning(
                    "snapshot file: rollback(s) of %s not yet in the store: written when it "
                    "answers",
                    ", ".join(sorted(snapshot.pending_rollbacks)),
                )
        return snapshot

    def _start_offline(
        self, store: RedisStore, snapshot: Snapshot | None, exc: StoreUnavailable
    ) -> None:
        """Redis is away at start: serve the snapshot file (or the flags file) until it answers."""
        path = self.settings.store.flags_file
        if snapshot is not None:
            source = f"the snapshot file {self.snapshot.path if self.snapshot else ''}"
            stored = store.imaged_flags()
        else:
            source = f"the flags file {path}" if path else "no flags"
            stored = _read_if_present(path) if path else []
        log.warning("%s; serving %s (%d flag(s)) until it answers", exc, source, len(stored))
        self.install(stored)
        self.last_sync = snapshot.synced_at if snapshot is not None else 0.0
        now = self.clock()
        rollouts = store.imaged_rollouts() if snapshot is not None else {}
        for flag in self.router:
            if flag.key in rollouts:
                self.controller.apply(flag, rollouts[flag.key], now)
            if self.controller.rollback_pending(flag.key):
                flag.canary_open, flag.weight = False, 0.0
        self._seed_pending = True
        self.metrics.flag_store_up.set(0)
        store.open_later(self.on_change)

    def _snapshot_now(self) -> Snapshot:
        assert self.shared is not None
        pending = self.controller.unwritten_rollbacks()
        return Snapshot(self.shared.identity, self.shared.image(), self.last_sync, pending)

    def stale_age(self) -> float | None:
        """Seconds since the snapshot was last confirmed, while the store is away (NaN: never,
        the replica started while it was away); None while the store answers."""
        if self.store.healthy:
            return None
        return max(0.0, time.time() - self.last_sync) if self.last_sync else math.nan

    # -- what the admin port reads (admin.ports) -------------------------------------------------

    def flag(self, key: str) -> FlagRuntime | None:
        return self.router.by_key.get(key)

    def snapshot_flags(self) -> list[StoredFlag] | None:
        return self.shared.imaged_flags() if self.shared is not None else None

    def readiness(self) -> Readiness:
        return Readiness(
            ready=self.ready and self.pool is not None,
            flags=len(self.router),
            store_up=self.store.healthy,
            in_flight=self.proxy.in_flight,
            mirrors_in_flight=len(self.mirror.in_flight),
            snapshot_problems=dict(self.snapshot_problems),
        )

    def observe_store(self) -> None:
        self.metrics.flag_store_up.set(1 if self.store.healthy else 0)
        if self.store.kind == "memory":
            self.last_sync = time.time()  # the embedded store is the snapshot: never stale
        if self.last_sync:
            self.metrics.flag_store_sync_age.set(time.time() - self.last_sync)

    async def stop(self) -> None:
        """Stop the clocks, write what was decided and counted, close clients and store."""
        self.ready = False
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: redis-py can swallow a cancellation, and shutdown must not hang on it.
            await asyncio.wait(self._tasks, timeout=5)
        self._tasks.clear()
        self.proxy.close()
        with contextlib.suppress(Exception):
            await self.controller.drain()
            await self.mirror.drain(timeout_s=2.0)
            await self.counter_sync.flush()
        if self.snapshot is not None:
            with contextlib.suppress(Exception):
                await self.snapshot.flush()
        await self.store.close()
        if self.pool is not None:
            await self.pool.aclose()

    async def on_change(self, kind: ChangeKind, key: str) -> None:
        """The store says something changed (or it is time to re-sync): update the snapshot.

        Never raises: a change that cannot be applied leaves the previous snapshot serving,
        is logged and counted once, and shows in /readyz until a later change repairs it.
        """
        # One change at a time, and never between a tick's read and its apply (Controller.lock).
        async with self.controller.lock:
            await self._apply_change(kind, key)

    async def _apply_change(self, kind: ChangeKind, key: str) -> None:
        try:
            if kind == "rollout":
                await self.controller.refresh(key)
            elif kind in ("flag", "resync"):
                stored = await self.store.load()
                if self._seed_pending:  # started while Redis was away: it answers now
                    await self._seed_from_file()
                    self._seed_pending = False
                    stored = await self.store.load()
                self.install(stored)
                if kind == "resync":
                    for flag_key in list(self.router.by_key):
                        await self.controller.refresh(flag_key)
            self.metrics.flag_store_up.set(1)
        except StoreUnavailable:
            self.metrics.flag_store_up.set(0)  # keep serving the last snapshot (fail-static)
        except Exception as exc:  # the previous snapshot stays; the next change may repair it
            self._snapshot_failed(key or "*", f"{kind} change not applied: {exc!r}")

    def _snapshot_failed(self, key: str, why: str) -> None:
        self.snapshot_problems[key] = why
        if (key, why) in self._reported_problems:
            return
        self._reported_problems.add((key, why))
        self.metrics.snapshot_failures.labels(key).inc()
        log.error("flag %s: change not applied, serving the previous snapshot: %s", key, why)

    async def _seed_from_file(self) -> None:
        """With a shared store, the flags file only adds flags the store does not have yet."""
        path = self.settings.store.flags_file
        if self.store.kind == "memory" or not path:
            return
        for entry in await asyncio.to_thread(_read_if_present, path):
            if await self.store.get(entry.key) is not None:
                continue
            event = AuditEvent(ts=time.time(), actor="flags-file", action="create", flag=entry.key)
            with contextlib.suppress(PreconditionRequired):
                await self.store.put(entry.flag, entry.document, if_match=None, event=event)

    def install(self, stored: list[StoredFlag]) -> None:
        """Swap in a new snapshot; unchanged flags keep their compiled runtime.

        A flag that cannot be compiled, or whose stored document cannot be read, keeps the
        runtime it had (its route keeps serving); the others are applied.
        """
        assert self.pool is not None, "install() before start()"
        old = self.router.by_key
        unreadable: dict[str, str] = getattr(self.store, "unreadable", {})
        problems = {key: why for key, why in unreadable.items() if key in old}
        flags: list[FlagRuntime] = [old[key] for key in problems]
        for entry in stored:
            current = old.get(entry.key)
            # The document too: a flag deleted and created again starts over at version 1
            if (
                current is not None
                and current.version == entry.version
                and current.flag == entry.flag
            ):
                flags.append(current)
                continue
            if current is not None and entry.version <= current.version:
                self.controller.forget(entry.key)  # deleted and created again meanwhile
                current = None
            try:
                fresh = self._compiled(entry, current)
            except Exception as exc:  # a document this replica cannot serve: keep what it had
                problems[entry.key] = f"version {entry.version}: {exc!r}"
                if current is not None:
                    flags.append(current)
                continue
            flags.append(fresh)
            self.metrics.flags_version.labels(entry.key).set(entry.version)
        kept = {f.key for f in flags}
        for key, gone in old.items():
            if key not in kept:
                self.metrics.forget_flag(key, list(gone.arms))
                self.controller.forget(key)
        self.router = Router(flags)
        self.last_sync = time.time()
        self.snapshot_problems = {}
        for key, why in problems.items():
            self._snapshot_failed(key, why)
        if not self._statistics_loading and any(f.shadows for f in flags):
            # scipy (for the shadow tests) is slow and large to import: load it now, off the
            # event loop, rather than on the first flush while requests wait.
            self._statistics_loading = True
            self._tasks.append(asyncio.create_task(self._preload_statistics(), name="preload"))

    def _compiled(self, entry: StoredFlag, current: FlagRuntime | None) -> FlagRuntime:
        assert self.pool is not None
        fresh = compile_flag(
            entry.flag, entry.version, pool=self.pool, metrics=self.metrics, guard=self.new_guard
        )
        if current is not None:
            carry_over(current, fresh)
        return fresh

    async def _preload_statistics(self) -> None:
        await asyncio.to_thread(importlib.import_module, "scipy.stats")
        if self.after_preload is not None:
            self.after_preload()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        await self.start()
        try:
            yield self
        finally:
            await self.stop()


class _WithLifespan:
    """The data-plane app, answering the ASGI lifespan by starting and stopping the Gateway."""

    def __init__(self, proxy: Proxy, gateway: Gateway) -> None:
        self._proxy, self._gateway = proxy, gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self._proxy(scope, receive, send)
            return
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._gateway.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._gateway.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(settings: Settings, **kwargs: Any) -> Gateway:
    return Gateway(settings, **kwargs)


def _read_if_present(path: str) -> list[StoredFlag]:
    return read_flags_file(path) if Path(path).is_file() else []


SNAPSHOT_INTERVAL_S = 0.2  # how often the snapshot file is compared and, if changed, written


def _shared(store: FlagStore) -> RedisStore | None:
    if store.kind != "redis":
        return None
    from gateway.flagstore.redis import RedisStore

    return store if isinstance(store, RedisStore) else None


def _snapshot_path(settings: Settings) -> Path | None:
    configured = settings.store.snapshot_file
    if configured == "":
        return None
    return Path(configured) if configured else default_state_dir() / "snapshot.json"


def _make_store(settings: Settings) -> FlagStore:
    s = settings.store
    if s.kind == "memory":
        return MemoryStore(s.flags_file)
    from gateway.flagstore.redis import RedisStore

    return RedisStore(s.url, prefix=s.prefix, resync_interval_s=s.resync_interval_s)
