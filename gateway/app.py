"""Wiring: `create_app(settings)` builds a `Gateway` with its data-plane and admin apps.

No module-level state: the upstream clients, the flag store and the background tasks belong to
the Gateway and live between `start()` and `stop()` (or the data app's ASGI lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from gateway.admin import admin_routes
from gateway.controller import Controller
from gateway.core.flags import Flag
from gateway.errors import PreconditionRequired, StoreUnavailable
from gateway.flagstore import AuditEvent, FlagStore, MemoryStore, StoredFlag, read_flags_file
from gateway.flagstore.base import ChangeKind
from gateway.guard import CanaryGuard
from gateway.health import health_routes
from gateway.metrics import Metrics
from gateway.proxy import Message, Proxy, Receive, Scope, Send
from gateway.runtime import FlagRuntime, Router, carry_over, compile_flag
from gateway.settings import Settings
from gateway.shadow import Mirror
from gateway.sync import CounterSync
from gateway.upstream import UpstreamPool

log = logging.getLogger(__name__)


class Gateway:
    """One replica: snapshot, store, controller, upstream clients and the two ASGI apps."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        store: FlagStore | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
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
        )
        self.counter_sync = CounterSync(
            self.store,
            self.metrics,
            lambda: self.router,
            self.mirror,
            interval_s=settings.store.flush_interval_s,
        )
        self.data_app = _WithLifespan(self.proxy, self)
        self.admin_app = Starlette(routes=health_routes(self) + admin_routes(self))
        self._tasks: list[asyncio.Task[None]] = []
        self._statistics_loading = False
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
        await self.store.open(self.on_change)
        await self._seed_from_file()
        self.install(await self.store.load())
        await self.controller.tick()
        self._tasks.append(asyncio.create_task(self.controller.run(), name="controller"))
        self._tasks.append(asyncio.create_task(self.counter_sync.run(), name="counter-sync"))

        self.metrics.flag_store_up.set(1)
        self.ready = True

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
        await self.store.close()
        if self.pool is not None:
            await self.pool.aclose()

    async def on_change(self, kind: ChangeKind, key: str) -> None:
        """The store says something changed (or it is time to re-sync): update the snapshot."""
        try:
            if kind == "rollout":
                await self.controller.refresh(key)
            elif kind in ("flag", "resync"):
                self.install(await self.store.load())
                if kind == "resync":
                    for flag_key in list(self.router.by_key):
                        await self.controller.refresh(flag_key)
            self.metrics.flag_store_up.set(1)
        except StoreUnavailable:
            self.metrics.flag_store_up.set(0)  # keep serving the last snapshot (fail-static)

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
        """Swap in a new snapshot; unchanged flags keep their compiled runtime."""
        assert self.pool is not None, "install() before start()"
        old = self.router.by_key
        flags: list[FlagRuntime] = []
        for entry in stored:
            current = old.get(entry.key)
            if current is not None and current.version == entry.version:
                flags.append(current)
                continue
            fresh = compile_flag(
                entry.flag,
                entry.version,
                pool=self.pool,
                metrics=self.metrics,
                guard=self.new_guard,
            )
            if current is not None:
                carry_over(current, fresh)
            flags.append(fresh)
            self.metrics.flags_version.labels(entry.key).set(entry.version)
        for key, gone in old.items():
            if key not in {e.key for e in stored}:
                self.metrics.forget_flag(key, list(gone.arms))
        self.router = Router(flags)
        self.last_sync = time.time()
        if not self._statistics_loading and any(f.shadows for f in flags):
            # scipy (for the shadow tests) takes a second or more and ~50 MB to import: load it
            # now, off the event loop, rather than on the first flush while requests wait.
            self._statistics_loading = True
            self._tasks.append(asyncio.create_task(self._preload_statistics(), name="preload"))

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


def _make_store(settings: Settings) -> FlagStore:
    s = settings.store
    if s.kind == "memory":
        return MemoryStore(s.flags_file)
    from gateway.flagstore.redis import RedisStore

    return RedisStore(s.url, prefix=s.prefix, resync_interval_s=s.resync_interval_s)
