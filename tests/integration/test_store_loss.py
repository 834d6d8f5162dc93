"""Store loss at the flag store's level, against a real Redis (DESIGN 7, "Store loss"): the
generation marker, the restore from a replica's image exactly once however many replicas find
the store lost, what a restore brings back (every hash of a flag's runtime state, as it was),
and the two ways a store is legitimately empty (every flag deleted; `gateway store reset`).

Losing the store is done to the test's own prefix (its keys deleted, marker included), which is
what a restart without persistence or a flush does to it; the fleet tests in
test_store_loss_fleet.py restart a real redis-server empty.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from conftest import GATEWAY_BIN

from gateway.core.flags import parse_flag
from gateway.core.paired import RunningStats
from gateway.core.schedule import Phase, Rollout
from gateway.flagstore import AuditEvent, GuardDelta, GuardState
from gateway.flagstore.base import ChangeKind
from gateway.flagstore.redis import RedisStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def document(key: str) -> dict[str, Any]:
    return {
        "key": key,
        "route": {"path_prefix": f"/v1/{key}"},
        "stable": {"name": "v1", "upstream": "http://127.0.0.1:9001"},
        "canary": {"name": "v2", "upstream": "http://127.0.0.1:9002"},
        "schedule": {"kind": "step", "steps": [{"weight": 0.1, "hold": "1h"}]},
        "shadows": [{"name": "v3", "upstream": "http://127.0.0.1:9003", "metric": "latency_ms"}],
    }


def event(action: str, flag: str = "sentiment") -> AuditEvent:
    return AuditEvent(ts=time.time(), actor="alice", action=action, flag=flag)


@dataclass(frozen=True, slots=True)
class Deployment:
    url: str  # what the store is given
    client: Callable[[], Any]  # a redis-py client on the current master(s), for checks


@pytest.fixture(params=["plain", "sentinel", "cluster"])
def deployment(request: pytest.FixtureRequest, redis_url: str) -> Deployment:
    """A plain Redis, a real Sentinel deployment, a real Cluster (tests/redis_topologies.py)."""
    if request.param == "plain":
        return Deployment(redis_url, lambda: redis.Redis.from_url(redis_url, decode_responses=True))
    topology = request.getfixturevalue(f"redis_{request.param}")
    return Deployment(topology.url, topology.client)


def everything(deployment: Deployment, prefix: str) -> dict[str, Any]:
    """Every key of the store as Redis holds it (hashes and sets; streams by length)."""
    client = deployment.client()
    found: dict[str, Any] = {}
    for name in client.scan_iter(match=f"{{{prefix}}}:*"):
        kind = client.type(name)
        if kind == "hash":
            found[name] = client.hgetall(name)
        elif kind == "set":
            found[name] = client.smembers(name)
        else:
            found[name] = f"{kind}:{client.xlen(name) if kind == 'stream' else '?'}"
    client.close()
    return found


def lose(deployment: Deployment, prefix: str) -> None:
    """What an empty restart does to this store: every key gone, the marker with them."""
    client = deployment.client()
    for name in client.scan_iter(match=f"{{{prefix}}}:*"):
        client.delete(name)
    client.close()


def restored_events(deployment: Deployment, prefix: str) -> list[dict[str, str]]:
    client = deployment.client()
    entries = client.xrange(f"{{{prefix}}}:audit")
    client.close()
    return [fields for _, fields in entries if fields["action"] == "store_restored"]


async def nothing(kind: ChangeKind, key: str) -> None:
    return None


@pytest.fixture
def scratch(deployment: Deployment, scratch_redis_prefix: str) -> Iterator[str]:
    lose(deployment, scratch_redis_prefix)
    yield scratch_redis_prefix
    lose(deployment, scratch_redis_prefix)


@pytest.fixture
async def replicas(
    deployment: Deployment, scratch: str
) -> AsyncIterator[Callable[..., RedisStore]]:
    made: list[RedisStore] = []

    async def make(name: str) -> RedisStore:
        url = deployment.url
        store = RedisStore(url, prefix=scratch, replica=name, resync_interval_s=3600)
        await store.open(nothing)
        made.append(store)
        return store

    yield make  # type: ignore[misc]
    for store in made:
        await store.close()


ROLLOUT = "p@1000.0"  # the guard's name for the rollout `fill` writes


async def fill(store: RedisStore, deployment: Deployment, prefix: str) -> None:
    """Two flags (one replaced), a rolled-back rollout, guard counts in a later test, shadow
    statistics, and a runtime hash of a kind this version does not know."""
    for key in ("sentiment", "toxicity"):
        await store.put(parse_flag(document(key)), document(key), if_match=None, event=event("c"))
    doc = {**document("sentiment"), "route": {"path_prefix": "/v2/sentiment"}}
    await store.put(parse_flag(doc), doc, if_match=1, event=event("replace"))
    started = Rollout(phase=Phase.RUNNING, started_at=1000.0, plan="p")
    await store.save_rollout("sentiment", started, expected=None)
    rolled_back = Rollout(phase=Phase.ROLLED_BACK, started_at=1000.0, plan="p", reason="sprt")
    assert await store.save_rollout("sentiment", rolled_back, expected=started)
    await store.start_guard("sentiment", rollout=ROLLOUT)
    await store.end_guard_test("sentiment", rollout=ROLLOUT, test=1, accepted=True, new_step=False)
    counted = GuardDelta("w", 1, ROLLOUT, 2, n=40, k=3, canary_requests=40, canary_errors=3)
    await store.add_guard_delta("sentiment", counted)
    await store.merge_shadow_stats(
        "sentiment", "v3", "latency_ms", RunningStats(5, 0.25, 1.5), ["{}"]
    )
    client = deployment.client()
    unknown = {"seq:replica-a": "17", "test": "2"}
    client.hset(f"{{{prefix}}}:runtime:sentiment", mapping=unknown)  # type: ignore[arg-type]
    client.close()


async def test_a_lost_store_is_restored_once_from_the_replicas_image(
    replicas: Callable[..., Any], deployment: Deployment, scratch: str
) -> None:
    await fill(await replicas("writer"), deployment, scratch)
    fleet = [await replicas(f"replica-{name}") for name in "abc"]  # each reads its image
    before = everything(deployment, scratch)
    restores: list[str] = []
    for store in fleet:
        store.on_restore = lambda store=store: restores.append(store.replica)

    lose(deployment, scratch)
    loads = await asyncio.gather(*(store.load() for store in fleet))

    assert len(restores) == 1, restores  # exactly one replica restored, fleet-wide
    for flags in loads:  # and no replica ever saw the empty store
        assert [(f.key, f.version) for f in flags] == [("sentiment", 2), ("toxicity", 1)]
    after = everything(deployment, scratch)
    meta = after.pop(f"{{{scratch}}}:meta")
    assert meta["restored_by"] == restores[0]
    assert after.pop(f"{{{scratch}}}:audit") == "stream:1"
    before.pop(f"{{{scratch}}}:meta")
    before.pop(f"{{{scratch}}}:audit")
    before.pop(f"{{{scratch}}}:pairs:sentiment:v3")  # pair logs are not part of the image
    assert after == before  # documents, versions, rollout, guard, shadow, the unknown hash
    [audited] = restored_events(deployment, scratch)
    assert audited["actor"] == restores[0]
    details = json.loads(audited["details"])
    assert details["replica"] == restores[0]
    assert details["flags"] == ["sentiment", "toxicity"]
    rollout = await fleet[1].rollout("sentiment")
    assert rollout is not None and rollout.phase is Phase.ROLLED_BACK


async def test_writes_that_reach_the_empty_store_first_do_not_survive_the_restore(
    replicas: Callable[..., Any], deployment: Deployment, scratch: str
) -> None:
    """A counter flush and a fresh rollout state can land in the emptied store before a load
    notices: the restore replaces them with the image, and the image is not spoiled by them."""
    a = await replicas("replica-a")
    await fill(a, deployment, scratch)
    lose(deployment, scratch)

    late = GuardDelta("w", 2, ROLLOUT, 2, n=1, canary_requests=1)
    assert await a.add_guard_delta("sentiment", late) == GuardState()  # nothing to add to
    assert (await a.start_guard("sentiment", rollout=ROLLOUT)).test == 1
    fresh = Rollout(phase=Phase.RUNNING, started_at=2000.0, plan="p")
    assert await a.save_rollout("sentiment", fresh, expected=None)
    await a.merge_shadow_stats("sentiment", "v3", "latency_ms", RunningStats(1, 9.0, 0.0), [])
    await a.load()

    rollout = await a.rollout("sentiment")
    assert rollout is not None and rollout.phase is Phase.ROLLED_BACK
    stored = everything(deployment, scratch)
    guard = stored[f"{{{scratch}}}:guard:sentiment"]
    assert (guard["rollout"], guard["test"], guard["accepts"]) == (ROLLOUT, "2", "1")
    assert (guard["n"], guard["k"], guard["cn"], guard["ce"]) == ("40", "3", "40", "3")
    assert stored[f"{{{scratch}}}:shadow:sentiment:v3:latency_ms"]["n"] == "5"


async def test_deleting_every_flag_keeps_the_marker_and_restores_nothing(
    replicas: Callable[..., Any], deployment: Deployment, scratch: str
) -> None:
    a = await replicas("replica-a")
    b = await replicas("replica-b")
    await fill(a, deployment, scratch)
    await b.load()
    restores: list[str] = []
    b.on_restore = lambda: restores.append("b")
    await a.delete("sentiment", if_match=2, event=event("delete"))
    await a.delete("toxicity", if_match=1, event=event("delete", "toxicity"))

    assert await b.load() == []
    assert await a.load() == []
    assert restores == []
    assert f"{{{scratch}}}:meta" in everything(deployment, scratch)
    assert restored_events(deployment, scratch) == []
    assert b.imaged_flags() == []


async def test_store_reset_wipes_audits_and_is_not_taken_for_a_loss(
    replicas: Callable[..., Any], deployment: Deployment, scratch: str
) -> None:
    a = await replicas("replica-a")
    await fill(a, deployment, scratch)
    generation = everything(deployment, scratch)[f"{{{scratch}}}:meta"]["generation"]
    settings = {"store": {"kind": "redis", "url": deployment.url, "prefix": scratch}}
    refused = await asyncio.to_thread(
        subprocess.run,
        [str(GATEWAY_BIN), "store", "reset", "--redis-url", deployment.url],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert len(a.imaged_flags()) == 2 and len(await a.load()) == 2

    config = json.dumps(settings)  # JSON is YAML
    done = await asyncio.to_thread(
        subprocess.run,
        [str(GATEWAY_BIN), "store", "reset", "--yes", "--config", "/dev/stdin", "--reason", "t"],
        input=config,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr

    assert await a.load() == []  # a new generation: empty on purpose, nothing restored
    left = everything(deployment, scratch)
    assert set(left) == {f"{{{scratch}}}:meta", f"{{{scratch}}}:audit"}
    assert left[f"{{{scratch}}}:meta"]["generation"] != generation
    client = deployment.client()
    [(_, audited)] = client.xrange(f"{{{scratch}}}:audit")
    client.close()
    assert audited["action"] == "store_reset" and audited["reason"] == "t"
    assert audited["actor"].startswith("cli:")
    assert json.loads(audited["details"])["keys"] >= 6


async def test_a_store_from_before_the_marker_gets_one_on_first_load(
    replicas: Callable[..., Any], deployment: Deployment, scratch: str
) -> None:
    a = await replicas("replica-a")
    await fill(a, deployment, scratch)
    client = deployment.client()
    client.delete(f"{{{scratch}}}:meta")
    client.close()
    assert len(await a.load()) == 2
    assert f"{{{scratch}}}:meta" in everything(deployment, scratch)
    assert restored_events(deployment, scratch) == []
