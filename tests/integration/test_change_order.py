"""A replica applies what it reads from the store in the order it read it.

A replica reads the store from several tasks at once: the subscription delivering changes, the
timed resync, the admin API after its own writes (read-your-writes), the controller's tick and
the rollback writes its guard spawns. Each awaits Redis between its read and its apply. These
tests drive those tasks concurrently against a real Redis (and the embedded store) through
in-process gateways, and check that a state read earlier is never applied over one read later:
a PUT's answer is what the replica serves, and a rolled-back canary stays closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from conftest import flag_doc

from gateway.app import Gateway
from gateway.core.schedule import Phase
from gateway.flagstore import MemoryStore
from gateway.flagstore.redis import RedisStore
from gateway.settings import Admin, AdminToken, Settings, Store

pytestmark = pytest.mark.anyio
SECRET = "s3cret-operator"
ROUNDS = 60


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def replica(
    kind: str, url: str, prefix: str, state_dir: Any, name: str, clock: Any = time.time
) -> Gateway:
    token = AdminToken(name="ops", role="operator", secret=SECRET)
    config = Settings(
        admin=Admin(tokens=(token,)),
        store=Store(
            kind=kind,
            flags_file=None,
            flush_interval_s=3600,
            snapshot_file=str(state_dir / f"{name}.json"),
        ),
        controller_interval_s=3600,  # the test ticks
    )
    store = (
        MemoryStore(None)
        if kind == "memory"
        else RedisStore(url, prefix=prefix, resync_interval_s=3600)
    )
    return Gateway(config, store=store, clock=clock)


@contextlib.asynccontextmanager
async def admin_of(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    await gateway.start()
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway.admin_app),
        base_url="http://admin",
        headers={"Authorization": f"Bearer {SECRET}"},
    )
    try:
        yield client
    finally:
        await client.aclose()
        await gateway.stop()


async def hammer(*calls: Any) -> None:
    """Run the calls over and over, each in its own task, until cancelled."""

    async def again(call: Any) -> None:
        while True:
            await call()
            await asyncio.sleep(0)

    await asyncio.gather(*(again(call) for call in calls))


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_put_answer_is_what_the_replica_serves_while_changes_arrive(
    kind: str, redis_url: str, scratch_redis_prefix: str, tmp_path: Any
) -> None:
    """Deliveries of older changes keep arriving while the operator edits: once a PUT has
    answered, the replica serves that version or a later one, never the one before."""
    gateway = replica(kind, redis_url, scratch_redis_prefix, tmp_path, "a")
    async with admin_of(gateway) as admin:
        doc = flag_doc("http://127.0.0.1:9", None)["flags"][0]
        created = await admin.put(f"/admin/flags/{doc['key']}", json=doc)
        assert created.status_code == 201, created.text
        version = created.json()["version"]
        deliveries = asyncio.create_task(
            hammer(
                lambda: gateway.on_change("flag", doc["key"]),
                lambda: gateway.on_change("resync", ""),
            )
        )
        regressions = []
        try:
            for i in range(ROUNDS):
                doc["guard"] = {"alpha": 0.01 + 0.0001 * (i + 1)}  # a new version each round
                answer = await admin.put(
                    f"/admin/flags/{doc['key']}", json=doc, headers={"If-Match": str(version)}
                )
                assert answer.status_code == 200, answer.text
                version = answer.json()["version"]
                served = gateway.router.by_key[doc["key"]].version
                if served < version:
                    regressions.append((version, served))
        finally:
            deliveries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deliveries
    assert regressions == [], f"served an older version after the PUT answered: {regressions[:5]}"


async def test_a_rollback_read_by_a_replica_is_not_undone_by_its_own_tick(
    redis_url: str, scratch_redis_prefix: str, tmp_path: Any
) -> None:
    """Replica B ticks continuously while replica A's operator rolls the canary back: once B
    has adopted the rollback, no tick that read the store before it reopens the canary."""
    a = replica("redis", redis_url, scratch_redis_prefix, tmp_path, "a")
    b = replica("redis", redis_url, scratch_redis_prefix, tmp_path, "b")
    doc = flag_doc("http://127.0.0.1:9", "http://127.0.0.1:10")["flags"][0]
    key = doc["key"]
    reopened = []
    async with admin_of(a) as admin, admin_of(b):
        created = await admin.put(f"/admin/flags/{key}", json=doc)
        assert created.status_code == 201, created.text
        await a.controller.tick()
        for round_ in range(ROUNDS // 2):
            await _until(lambda: b.flag(key) is not None and b.flag(key).canary_open, b, key)
            ticks = asyncio.create_task(hammer(b.controller.tick, b.controller.tick))
            try:
                back = await admin.post(f"/admin/flags/{key}/rollback", json={"reason": "r"})
                assert back.status_code == 200, back.text
                await _until(lambda: _rolled_back(b, key), b, key)  # B's subscription delivered
                await asyncio.sleep(0.05)  # ticks that had read the store before keep going
            finally:
                ticks.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticks
            await b.controller.tick()  # one more, alone: what B now believes
            flag = b.flag(key)
            assert flag is not None
            if flag.canary_open or not _rolled_back(b, key):
                reopened.append(round_)
            again = await admin.post(f"/admin/flags/{key}/restart", json={"reason": "again"})
            assert again.status_code == 200, again.text
    assert reopened == [], f"the rolled-back canary reopened on B in rounds {reopened}"


def _rolled_back(gateway: Gateway, key: str) -> bool:
    rollout = gateway.controller.rollout(key)
    return rollout is not None and rollout.phase is Phase.ROLLED_BACK


async def _until(condition: Any, gateway: Gateway, key: str, within_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        assert loop.time() < deadline, f"{key} never got there: {gateway.controller.rollout(key)}"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_restart_at_the_same_clock_reading_is_a_new_rollout_with_a_fresh_test(
    kind: str, redis_url: str, scratch_redis_prefix: str, tmp_path: Any
) -> None:
    """The guard rolls the canary back and the operator restarts it before the clock has moved
    (a frozen or coarse clock): the restart is still a new rollout, so the guard's test starts
    again untripped and the canary reopens, rather than staying closed by the old verdict."""
    frozen = 1_800_000_000.0
    gateway = replica(kind, redis_url, scratch_redis_prefix, tmp_path, "a", clock=lambda: frozen)
    doc = flag_doc("http://127.0.0.1:9", "http://127.0.0.1:10")["flags"][0]
    key = doc["key"]
    async with admin_of(gateway) as admin:
        assert (await admin.put(f"/admin/flags/{key}", json=doc)).status_code == 201
        await gateway.controller.tick()
        flag = gateway.flag(key)
        assert flag is not None and flag.guard is not None and flag.canary_open
        while not flag.guard.tripped:
            flag.guard.observe(True)
        await gateway.controller.drain()
        assert _rolled_back(gateway, key) and not flag.canary_open
        started = gateway.controller.rollout(key).started_at  # type: ignore[union-attr]
        again = await admin.post(f"/admin/flags/{key}/restart", json={"reason": "fixed"})
        assert again.status_code == 200, again.text
        await gateway.controller.tick()
        flag = gateway.flag(key)
        assert flag is not None and flag.guard is not None
        rollout = gateway.controller.rollout(key)
        assert rollout is not None and rollout.phase is Phase.RUNNING
        assert rollout.started_at > started
        assert not flag.guard.tripped and flag.guard.n == 0
        assert flag.canary_open and flag.weight > 0


async def _noop(kind: Any, key: str) -> None:
    return None


@pytest.mark.parametrize("action", ["pause", "resume", "promote", "rollback"])
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_rollback_a_refused_action_read_closes_the_canary_at_once(
    kind: str, action: str, redis_url: str, scratch_redis_prefix: str, tmp_path: Any
) -> None:
    """Another replica rolls the canary back; before this replica's change message arrives, an
    operator's action on it reads the store and is refused (409, the rollout is rolled back).
    What that read showed is served at once: the canary is closed when the 409 answers, so the
    replica's status and its request path never disagree."""
    gateway = replica(kind, redis_url, scratch_redis_prefix, tmp_path, "a")
    doc = flag_doc("http://127.0.0.1:9", "http://127.0.0.1:10")["flags"][0]
    key = doc["key"]
    async with admin_of(gateway) as admin:
        assert (await admin.put(f"/admin/flags/{key}", json=doc)).status_code == 201
        await gateway.controller.tick()
        flag = gateway.flag(key)
        assert flag is not None and flag.canary_open and flag.weight > 0
        other = gateway.store
        if kind == "redis":  # another replica's own connection to the same store
            other = RedisStore(redis_url, prefix=scratch_redis_prefix, resync_interval_s=3600)
            await other.open(_noop)
        try:
            running = await other.rollout(key)
            assert running is not None and running.phase is Phase.RUNNING
            rolled_back = replace(running, phase=Phase.ROLLED_BACK, reason="other replica")
            assert await other.save_rollout(key, rolled_back, expected=running)
            refused = await admin.post(f"/admin/flags/{key}/{action}", json={"reason": "late"})
            assert refused.status_code == 409, refused.text
            flag = gateway.flag(key)
            assert flag is not None
            assert _rolled_back(gateway, key), gateway.controller.rollout(key)
            assert not flag.canary_open and flag.weight == 0.0
        finally:
            if other is not gateway.store:
                await other.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_new_canary_starts_at_its_first_step_not_at_the_old_ones_weight(
    kind: str, redis_url: str, scratch_redis_prefix: str, tmp_path: Any
) -> None:
    """The canary at 50 % is replaced by a new one: from the PUT's answer on, the new canary
    gets no traffic by weight until the controller starts its rollout, then its first step's
    1 %; never the 50 % its predecessor had reached."""
    now = [1_800_000_000.0]
    gateway = replica(kind, redis_url, scratch_redis_prefix, tmp_path, "a", clock=lambda: now[0])
    doc = flag_doc("http://127.0.0.1:9", "http://127.0.0.1:10")["flags"][0]
    doc["schedule"] = {
        "kind": "step",
        "steps": [{"weight": 0.01, "hold": "1m"}, {"weight": 0.5, "hold": "1h"}],
    }
    doc["advance_requires_evidence"] = False  # the hold alone moves it on
    key = doc["key"]
    async with admin_of(gateway) as admin:
        created = await admin.put(f"/admin/flags/{key}", json=doc)
        assert created.status_code == 201, created.text
        await gateway.controller.tick()
        now[0] += 61
        await gateway.controller.tick()
        flag = gateway.flag(key)
        assert flag is not None and flag.weight == 0.5
        doc["canary"] = {"name": "v3", "upstream": "http://127.0.0.1:11"}
        replaced = await admin.put(
            f"/admin/flags/{key}", json=doc, headers={"If-Match": str(created.json()["version"])}
        )
        assert replaced.status_code == 200, replaced.text
        flag = gateway.flag(key)
        assert flag is not None and flag.canary is not None and flag.canary.name == "v3"
        assert flag.weight == 0.0
        await gateway.controller.tick()
        flag = gateway.flag(key)
        assert flag is not None and flag.weight == 0.01 and flag.canary_open
