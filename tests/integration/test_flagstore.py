"""The flag stores: their shared contract (memory and Redis alike), then what only the Redis
store does, against a real Redis: concurrent writers, change messages between replicas, the
timed resync that repairs a lost message, and Redis going away and coming back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis

from gateway.core.flags import parse_flag
from gateway.core.paired import RunningStats
from gateway.core.schedule import Phase, Rollout
from gateway.core.totals import Totals
from gateway.errors import ConflictError, NotFoundError, PreconditionRequired, StoreUnavailable
from gateway.flagstore import (
    AuditEvent,
    FlagStore,
    GuardDelta,
    GuardState,
    MemoryStore,
    StoredFlag,
)
from gateway.flagstore.base import ChangeKind
from gateway.flagstore.redis import Keys, RedisStore, describe

pytestmark = pytest.mark.anyio

AUDIT_FIELDS = {
    "ts", "actor", "action", "flag", "version_before", "version_after", "diff", "reason",
    "details",
}  # fmt: skip


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- helpers ------------------------------------------------------------------------------------


def flag_document(
    key: str = "sentiment", *, upstream: str = "http://127.0.0.1:9001"
) -> dict[str, Any]:
    return {
        "key": key,
        "route": {"path_prefix": f"/v1/{key}"},
        "stable": {"name": "v1", "upstream": upstream},
    }


def audit_event(
    action: str, flag: str = "sentiment", *, actor: str = "alice", **kw: Any
) -> AuditEvent:
    return AuditEvent(ts=time.time(), actor=actor, action=action, flag=flag, **kw)


async def put(
    store: FlagStore,
    key: str = "sentiment",
    *,
    if_match: int | None = None,
    upstream: str = "http://127.0.0.1:9001",
    actor: str = "alice",
) -> StoredFlag:
    doc = flag_document(key, upstream=upstream)
    action = "create" if if_match is None else "replace"
    event = audit_event(action, key, actor=actor)
    return await store.put(parse_flag(doc), doc, if_match=if_match, event=event)


def started(at: float = 1000.0, **kw: Any) -> Rollout:
    return Rollout(phase=Phase.RUNNING, started_at=at, **kw)


async def eventually(condition: Callable[[], bool], *, within_s: float = 5.0) -> None:
    """Wait until `condition()` holds (a property such as `healthy` has no event to await)."""
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110 - polling a plain attribute
            await asyncio.sleep(0.02)


async def until_subscribed(url: str, channel: str, *, count: int, within_s: float = 5.0) -> None:
    """Wait until Redis itself counts `count` subscribers of `channel`."""
    async with aioredis.Redis.from_url(url) as raw, asyncio.timeout(within_s):
        while True:
            [(_, subscribers)] = await raw.pubsub_numsub(channel)
            if subscribers >= count:
                return
            await asyncio.sleep(0.02)


class Changes:
    """An `on_change` that records every call; `wait_for` waits for one (never a bare sleep)."""

    def __init__(self) -> None:
        self.seen: list[tuple[ChangeKind, str]] = []
        self._arrived = asyncio.Condition()

    async def __call__(self, kind: ChangeKind, key: str) -> None:
        async with self._arrived:
            self.seen.append((kind, key))
            self._arrived.notify_all()

    def mark(self) -> int:
        return len(self.seen)

    async def wait_for(
        self, kind: ChangeKind, key: str, *, since: int = 0, within_s: float = 5.0
    ) -> None:
        try:
            async with asyncio.timeout(within_s), self._arrived:
                await self._arrived.wait_for(lambda: (kind, key) in self.seen[since:])
        except TimeoutError:
            pytest.fail(f"no on_change({kind!r}, {key!r}) within {within_s}s: {self.seen[since:]}")


def remove_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    for name in client.scan_iter(match=f"{{{prefix}}}:*"):
        client.delete(name)
    client.close()


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def changes() -> Changes:
    return Changes()


@pytest.fixture
def scratch(redis_url: str, scratch_redis_prefix: str) -> Iterator[str]:
    """The test's own key prefix on the session Redis, emptied before and after."""
    remove_keys(redis_url, scratch_redis_prefix)
    yield scratch_redis_prefix
    remove_keys(redis_url, scratch_redis_prefix)


@pytest.fixture(params=["memory", "redis", "redis-sentinel", "redis-cluster"])
async def store(
    request: pytest.FixtureRequest, changes: Changes, redis_url: str, scratch: str
) -> AsyncIterator[FlagStore]:
    """Each store, opened with `changes` as its on_change: the Redis store on a plain Redis,
    on a real Sentinel deployment and on a real Cluster (tests/redis_topologies.py)."""
    opened: FlagStore
    if request.param == "memory":
        opened = MemoryStore(None)
    elif request.param == "redis":
        opened = RedisStore(redis_url, prefix=scratch)
    else:
        deployment = request.getfixturevalue(request.param.replace("-", "_"))
        opened = RedisStore(deployment.url, prefix=scratch)
    await opened.open(changes)
    yield opened
    await opened.close()


@pytest.fixture
async def redis_stores(redis_url: str, scratch: str) -> AsyncIterator[Callable[..., RedisStore]]:
    """`make(url=None, **options)`: RedisStores on the test's prefix, closed at the end."""
    made: list[RedisStore] = []

    def make(url: str | None = None, **options: Any) -> RedisStore:
        made.append(RedisStore(url or redis_url, prefix=scratch, **options))
        return made[-1]

    yield make
    for each in made:
        await each.close()


# --- the contract both stores keep -------------------------------------------------------------


async def test_a_created_flag_reads_back_at_version_1(store: FlagStore) -> None:
    created = await put(store, "b")
    await put(store, "a")

    assert created.version == 1
    got = await store.get("b")
    assert got is not None
    assert (got.key, got.version, got.document) == ("b", 1, flag_document("b"))
    assert got.flag == parse_flag(flag_document("b"))
    assert [(f.key, f.version) for f in await store.load()] == [("a", 1), ("b", 1)]
    assert await store.get("missing") is None


async def test_replace_with_the_current_version_bumps_it(store: FlagStore) -> None:
    await put(store)
    replaced = await put(store, if_match=1, upstream="http://127.0.0.1:9002")

    assert replaced.version == 2
    got = await store.get("sentiment")
    assert got is not None
    assert got.version == 2
    assert got.flag.stable.upstream == "http://127.0.0.1:9002"


async def test_a_stale_version_is_a_conflict_and_changes_nothing(store: FlagStore) -> None:
    await put(store)
    await put(store, if_match=1, upstream="http://127.0.0.1:9002")

    with pytest.raises(ConflictError) as stale:
        await put(store, if_match=1, upstream="http://127.0.0.1:9003")
    assert (stale.value.key, stale.value.expected, stale.value.actual) == ("sentiment", 1, 2)
    with pytest.raises(ConflictError) as absent:
        await put(store, "ghost", if_match=3)
    assert (absent.value.expected, absent.value.actual) == (3, None)

    got = await store.get("sentiment")
    assert got is not None
    assert got.version == 2
    assert got.flag.stable.upstream == "http://127.0.0.1:9002"
    assert await store.get("ghost") is None
    assert [e.version_after for e in await store.audit()] == [2, 1]


async def test_replacing_without_if_match_is_refused(store: FlagStore) -> None:
    await put(store)
    with pytest.raises(PreconditionRequired, match="version 1"):
        await put(store, upstream="http://127.0.0.1:9002")
    got = await store.get("sentiment")
    assert got is not None
    assert got.version == 1
    assert got.flag.stable.upstream == "http://127.0.0.1:9001"


async def test_delete_needs_the_current_version_and_takes_the_runtime_state(
    store: FlagStore,
) -> None:
    await put(store)
    await put(store, if_match=1, upstream="http://127.0.0.1:9002")
    await store.save_rollout("sentiment", started(), expected=None)
    await store.start_guard("sentiment", rollout="R1")
    await store.add_guard_delta("sentiment", delta(1, 1, n=10, k=1))

    with pytest.raises(ConflictError) as stale:
        await store.delete("sentiment", if_match=1, event=audit_event("delete"))
    assert (stale.value.expected, stale.value.actual) == (1, 2)
    assert await store.get("sentiment") is not None

    await store.delete("sentiment", if_match=2, event=audit_event("delete"))
    assert await store.get("sentiment") is None
    assert await store.load() == []
    assert await store.rollout("sentiment") is None
    assert await store.guard_state("sentiment") == GuardState()
    with pytest.raises(NotFoundError):
        await store.delete("sentiment", if_match=2, event=audit_event("delete"))


async def test_audit_is_newest_first_with_versions_and_actor(store: FlagStore) -> None:
    await put(store, actor="alice")
    await put(store, "other", actor="carol")
    await put(store, if_match=1, upstream="http://127.0.0.1:9002", actor="bob")
    await store.delete("sentiment", if_match=2, event=audit_event("delete", actor="carol"))
    await store.record(audit_event("rollback", reason="errors", actor="dave"))

    events = await store.audit(flag="sentiment")
    got = [(e.action, e.actor, e.version_before, e.version_after) for e in events]
    assert got == [
        ("rollback", "dave", None, None),
        ("delete", "carol", 2, None),
        ("replace", "bob", 1, 2),
        ("create", "alice", None, 1),
    ]
    assert events[0].reason == "errors"
    assert [e.flag for e in await store.audit(limit=3)] == ["sentiment", "sentiment", "sentiment"]
    assert [e.flag for e in await store.audit()][-2:] == ["other", "sentiment"]
    assert [e.action for e in await store.audit(flag="other")] == ["create"]
    assert await store.audit(flag="nobody") == []


async def test_the_audit_keeps_the_event_as_given_and_only_names_the_actor(
    store: FlagStore,
) -> None:
    # The admin API puts a token's name in `actor`; the store must keep exactly the event
    # (nothing added, nothing lost), so the secret can never travel through it.
    token_name, secret = "ci-deployer", "s3cr3t-t0ken"
    doc = flag_document()
    created = AuditEvent(
        ts=1700000000.25,
        actor=token_name,
        action="create",
        flag="sentiment",
        diff=[{"op": "add", "path": "/stable", "value": {"name": "v1"}}],
        reason="first rollout",
        details={"source": "cli", "dry_run": False},
    )
    await store.put(parse_flag(doc), doc, if_match=None, event=created)
    action = replace(created, action="pause", ts=1700000001.5, version_before=1, version_after=1)
    await store.record(action)

    events = await store.audit()
    assert events == [action, replace(created, version_before=None, version_after=1)]
    assert all(secret not in json.dumps(e.as_dict()) for e in events)
    assert {e.actor for e in events} == {token_name}


async def test_rollout_state_is_compare_and_set(store: FlagStore) -> None:
    assert await store.rollout("sentiment") is None
    first = started(at=1000)  # an int: must compare equal to the 1000.0 read back
    assert await store.save_rollout("sentiment", first, expected=None) is True
    assert await store.save_rollout("sentiment", started(at=2000.0), expected=None) is False

    current = await store.rollout("sentiment")
    assert current == first
    paused = replace(first, phase=Phase.PAUSED, paused_since=1500.0)
    stale = started(at=999.0)
    assert await store.save_rollout("sentiment", paused, expected=stale) is False
    assert await store.save_rollout("sentiment", paused, expected=current) is True
    assert await store.rollout("sentiment") == paused
    # The state read back is a valid `expected` for the next step.
    resumed = replace(first, paused_total=10.0, reason="operator")
    assert await store.save_rollout("sentiment", resumed, expected=await store.rollout("sentiment"))
    assert await store.rollout("sentiment") == resumed
    assert await store.save_rollout("sentiment", first, expected=paused) is False


async def test_a_rollout_change_can_be_audited_with_it(store: FlagStore) -> None:
    await store.save_rollout("sentiment", started(), expected=None)
    rolled_back = started(reason="sprt")
    rolled_back = replace(rolled_back, phase=Phase.ROLLED_BACK, changed_at=1010.0)
    event = audit_event("rollback", reason="sprt", actor="guard", details={"llr": 4.83})

    assert await store.save_rollout("sentiment", rolled_back, expected=started(), event=event)
    assert await store.audit() == [event]
    # A lost compare-and-set audits nothing.
    assert not await store.save_rollout("sentiment", started(), expected=started(), event=event)
    assert await store.audit() == [event]


def delta(
    seq: int, test: int, *, replica: str = "r1", rollout: str = "R1", **counts: Any
) -> GuardDelta:
    return GuardDelta(replica=replica, seq=seq, rollout=rollout, test=test, **counts)


async def test_guard_state_is_versioned_by_rollout_and_test(store: FlagStore) -> None:
    # Nothing counts before the rollout is named.
    assert await store.add_guard_delta("sentiment", delta(1, 1, n=5)) == GuardState()
    assert await store.start_guard("sentiment", rollout="R1") == GuardState(rollout="R1")
    # A second replica starting the same rollout changes nothing.
    await store.add_guard_delta("sentiment", delta(1, 1, n=10, k=1, canary_requests=10))
    after = await store.start_guard("sentiment", rollout="R1")
    assert (after.rollout, after.test, after.n, after.k) == ("R1", 1, 10, 1)

    # A delta for another rollout, or a test not reached, is dropped.
    assert await store.add_guard_delta("sentiment", delta(2, 1, rollout="R0", n=9)) == after
    assert await store.add_guard_delta("sentiment", delta(3, 2, n=9)) == after

    # Ending test 1 (accepted): test 2 at zero, the step's arm counts kept; once only.
    ended = await store.end_guard_test(
        "sentiment", rollout="R1", test=1, accepted=True, new_step=False
    )
    assert (ended.test, ended.accepts, ended.n, ended.k, ended.canary_requests) == (2, 1, 0, 0, 10)
    again = await store.end_guard_test(
        "sentiment", rollout="R1", test=1, accepted=True, new_step=False
    )
    assert again == ended
    # A late delta for test 1 adds its requests to the step, not its trials to test 2.
    late = await store.add_guard_delta("sentiment", delta(4, 1, n=3, k=1, canary_requests=3))
    assert (late.test, late.n, late.k, late.canary_requests) == (2, 0, 0, 13)
    now = await store.add_guard_delta(
        "sentiment", delta(5, 2, n=2, k=1, llr=-0.25, stable_requests=7, stable_errors=1)
    )
    assert (now.n, now.k, now.llr, now.stable_requests, now.stable_errors) == (2, 1, -0.25, 7, 1)

    # A new step: test 3, arm counts zeroed; a delta from the old step adds nothing at all.
    step = await store.end_guard_test(
        "sentiment", rollout="R1", test=2, accepted=False, new_step=True
    )
    assert (step.test, step.accepts, step.step_from, step.canary_requests) == (3, 1, 3, 0)
    assert await store.add_guard_delta("sentiment", delta(6, 2, canary_requests=4)) == step

    # A new rollout starts again at test 1; the old rollout's deltas are dropped.
    fresh = await store.start_guard("sentiment", rollout="R2")
    assert fresh == GuardState(rollout="R2")
    assert await store.add_guard_delta("sentiment", delta(7, 3, n=1)) == fresh
    assert await store.guard_state("other") == GuardState()


async def test_a_guard_delta_sent_again_is_applied_once(store: FlagStore) -> None:
    await store.start_guard("sentiment", rollout="R1")
    first = delta(1, 1, n=10, k=2, canary_requests=10, canary_errors=2)
    once = await store.add_guard_delta("sentiment", first)
    # The reply was lost; the replica sends the same delta again (same replica and seq).
    assert await store.add_guard_delta("sentiment", first) == once
    assert (once.n, once.k, once.canary_requests) == (10, 2, 10)
    # Another replica's seq 1 is its own; the first replica's next seq applies.
    other = await store.add_guard_delta("sentiment", delta(1, 1, replica="r2", n=1))
    assert other.n == 11
    nxt = await store.add_guard_delta("sentiment", delta(2, 1, n=4, canary_requests=4))
    assert (nxt.n, nxt.canary_requests) == (15, 14)
    # Across an acceptance the seqs stay, so an old delta's arm counts do not come back twice.
    await store.end_guard_test("sentiment", rollout="R1", test=1, accepted=True, new_step=False)
    assert (
        await store.add_guard_delta("sentiment", delta(2, 1, canary_requests=4))
    ).canary_requests == 14


async def test_writes_are_announced_to_on_change(store: FlagStore, changes: Changes) -> None:
    mark = changes.mark()
    await put(store)
    await changes.wait_for("flag", "sentiment", since=mark)

    mark = changes.mark()
    await store.save_rollout("sentiment", started(), expected=None)
    await changes.wait_for("rollout", "sentiment", since=mark)

    mark = changes.mark()
    await store.delete("sentiment", if_match=1, event=audit_event("delete"))
    await changes.wait_for("flag", "sentiment", since=mark)


async def test_shadow_stats_merge_fleet_wide(store: FlagStore) -> None:
    first, second = RunningStats.of([0.1, 0.25, -0.3]), RunningStats.of([1.5, 0.2])
    line = json.dumps({"flag": "sentiment", "shadow": "v3", "metric": "latency_ms", "d": 0.1})
    merge = store.merge_shadow_stats

    assert await merge("sentiment", "v3", "latency_ms", first, [line]) == Totals(first)
    merged = await merge("sentiment", "v3", "latency_ms", second, [line, line], unmeasured=2)
    # Exactly Chan's formula as the core computes it, so every replica agrees to the bit.
    assert merged == Totals(first.merge(second), unmeasured=2)
    assert await merge("sentiment", "v3", "latency_ms", RunningStats(), []) == merged
    assert await merge("sentiment", "v4", "latency_ms", second, []) == Totals(second)
    assert await merge("sentiment", "v3", "json:/score", second, []) == Totals(second)
    assert await merge("other", "v3", "latency_ms", RunningStats(), []) == Totals()
    # The always-valid p's running minimum only goes down, whoever looked.
    low = await merge("sentiment", "v3", "latency_ms", RunningStats(), [], p_look=0.25)
    assert low.p_min == 0.25
    again = await merge("sentiment", "v3", "latency_ms", RunningStats(), [], p_look=0.5)
    assert again.p_min == 0.25
    # The pair lines: Redis keeps them (capped) for the fleet-wide Wilcoxon test; one process
    # keeps none (its own pairs are all there are).
    kept = await store.shadow_pairs("sentiment", "v3")
    assert kept == (None if store.kind == "memory" else [line, line, line])


async def test_shadow_stats_freeze_the_default_tau_at_100_pairs(store: FlagStore) -> None:
    values = [math.sin(i) * 3 + i % 7 for i in range(250)]
    merge = store.merge_shadow_stats
    at_60 = await merge("sentiment", "v3", "latency_ms", RunningStats.of(values[:60]), [])
    assert at_60.tau is None
    # The first merge reaching 100 pairs freezes the sample sd of all of them, to the bit.
    at_130 = await merge("sentiment", "v3", "latency_ms", RunningStats.of(values[60:130]), [])
    expected = Totals().merge(RunningStats.of(values[:60])).merge(RunningStats.of(values[60:130]))
    assert at_130.tau == expected.tau == math.sqrt(expected.stats.m2 / 129)
    later = await merge("sentiment", "v3", "latency_ms", RunningStats.of(values[130:]), [])
    assert later.stats.n == 250 and later.tau == at_130.tau


# --- Redis: concurrent writers ------------------------------------------------------------------


async def _race(stores: list[RedisStore]) -> None:
    """20 writers replace version 1 at once: one wins, the others get 409, one audit event."""
    await put(stores[0])
    results = await asyncio.gather(
        *(
            put(s, if_match=1, upstream=f"http://127.0.0.1:{9100 + i}", actor=f"writer-{i}")
            for i, s in enumerate(stores)
        ),
        return_exceptions=True,
    )
    won = [(i, r) for i, r in enumerate(results) if isinstance(r, StoredFlag)]
    lost = [r for r in results if isinstance(r, ConflictError)]
    assert len(won) == 1, results
    assert len(lost) == len(stores) - 1, results
    assert all((c.expected, c.actual) == (1, 2) for c in lost)
    winner, stored = won[0]
    assert stored.version == 2
    got = await stores[0].get("sentiment")
    assert got is not None
    assert got.version == 2
    assert got.document == flag_document(upstream=f"http://127.0.0.1:{9100 + winner}")
    at_two = [e for e in await stores[0].audit(flag="sentiment") if e.version_after == 2]
    assert [(e.actor, e.version_before) for e in at_two] == [(f"writer-{winner}", 1)]


async def test_concurrent_puts_on_one_store_have_one_winner(
    redis_stores: Callable[..., RedisStore],
) -> None:
    one = redis_stores()
    await _race([one] * 20)


async def test_concurrent_puts_from_separate_connections_have_one_winner(
    redis_stores: Callable[..., RedisStore],
) -> None:
    await _race([redis_stores() for _ in range(20)])


async def test_shadow_merges_from_many_replicas_add_up_and_keep_the_pair_lines(
    redis_stores: Callable[..., RedisStore], redis_url: str, scratch: str
) -> None:
    replicas = [redis_stores(pairs_maxlen=1000) for _ in range(10)]
    batches = [[(i * 7 + j) % 11 / 10 - 0.5 for j in range(20)] for i in range(10)]

    await asyncio.gather(
        *(
            r.merge_shadow_stats(
                "sentiment", "v3", "latency_ms", RunningStats.of(b), [json.dumps({"d": b[0]})]
            )
            for r, b in zip(replicas, batches, strict=True)
        )
    )
    totals = await replicas[0].merge_shadow_stats(
        "sentiment", "v3", "latency_ms", RunningStats(), []
    )
    final = totals.stats
    everything = RunningStats.of(x for b in batches for x in b)
    assert final.n == everything.n == 200
    assert final.mean == pytest.approx(everything.mean, abs=1e-12)
    assert final.m2 == pytest.approx(everything.m2, rel=1e-12)
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as raw:
        entries = cast(
            list[tuple[str, dict[str, str]]],
            await raw.xrange(Keys(scratch).pairs("sentiment", "v3")),
        )
    assert sorted(json.loads(fields["line"])["d"] for _, fields in entries) == sorted(
        b[0] for b in batches
    )


async def test_concurrent_rollout_saves_have_one_winner(
    redis_stores: Callable[..., RedisStore],
) -> None:
    # E.g. every replica seeing the guard cross A at once: the rollback must happen once.
    replicas = [redis_stores() for _ in range(20)]
    current = started()
    await replicas[0].save_rollout("sentiment", current, expected=None)
    proposals = [replace(current, changed_at=2000.0 + i, reason=f"r{i}") for i in range(20)]
    # Connected beforehand, so the 20 reads land together and every replica compares the same
    # state: only the script's own check can then stop the 19 late writers.
    assert await asyncio.gather(*(r.rollout("sentiment") for r in replicas)) == [current] * 20

    saved = await asyncio.gather(
        *(
            r.save_rollout("sentiment", p, expected=current, event=audit_event("rollback"))
            for r, p in zip(replicas, proposals, strict=True)
        )
    )
    assert saved.count(True) == 1, saved
    assert await replicas[0].rollout("sentiment") == proposals[saved.index(True)]
    assert len(await replicas[0].audit()) == 1


# --- Redis: change messages and the resync ------------------------------------------------------


async def test_a_write_on_one_replica_reaches_the_other(
    redis_stores: Callable[..., RedisStore],
) -> None:
    a, b, heard = redis_stores(), redis_stores(), Changes()
    await a.open(Changes())
    await b.open(heard)

    await put(a)
    await heard.wait_for("flag", "sentiment")
    await a.save_rollout("sentiment", started(), expected=None)
    await heard.wait_for("rollout", "sentiment")
    await a.start_guard("sentiment", rollout="R1")
    await heard.wait_for("guard", "sentiment")
    stored = await b.get("sentiment")
    assert stored is not None
    assert stored.version == 1


async def test_a_lost_change_message_is_repaired_by_the_timed_resync(
    redis_stores: Callable[..., RedisStore], redis_url: str, scratch: str
) -> None:
    b, heard = redis_stores(resync_interval_s=0.2), Changes()
    await b.open(heard)
    await put(b)
    await heard.wait_for("flag", "sentiment")

    # Another writer changes the flag the way the store does, but its message never arrives.
    keys = Keys(scratch)
    doc = flag_document(upstream="http://127.0.0.1:9009")
    async with aioredis.Redis.from_url(redis_url) as raw:
        await raw.hset(keys.flag("sentiment"), mapping={"doc": json.dumps(doc), "version": 2})
        await raw.hset(
            keys.flag("late"), mapping={"doc": json.dumps(flag_document("late")), "version": 1}
        )
        await raw.sadd(keys.index, "late")
    mark = heard.mark()

    await heard.wait_for("resync", "", since=mark, within_s=2.0)
    assert [(f.key, f.version) for f in await b.load()] == [("late", 1), ("sentiment", 2)]
    assert ("flag", "sentiment") not in heard.seen[mark:]


async def test_a_document_that_no_longer_validates_is_skipped_and_logged_once(
    redis_stores: Callable[..., RedisStore],
    redis_url: str,
    scratch: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = redis_stores()
    await put(store)
    keys = Keys(scratch)
    broken = {**flag_document("broken"), "stable": {"name": "v1", "upstream": "ftp://nope"}}
    async with aioredis.Redis.from_url(redis_url) as raw:
        await raw.hset(keys.flag("broken"), mapping={"doc": json.dumps(broken), "version": 4})
        await raw.hset(keys.flag("garbled"), mapping={"doc": "{not json", "version": 1})
        await raw.sadd(keys.index, "broken", "garbled")

    with caplog.at_level(logging.ERROR, logger="gateway.flagstore.redis"):
        assert [f.key for f in await store.load()] == ["sentiment"]
        assert [f.key for f in await store.load()] == ["sentiment"]
        assert await store.get("broken") is None
    skipped = [r.getMessage() for r in caplog.records if "skipping flag" in r.getMessage()]
    assert len(skipped) == 2, skipped
    assert any("'broken' version 4" in m and "http" in m for m in skipped), skipped


async def test_the_keys_follow_the_documented_layout(
    redis_stores: Callable[..., RedisStore], redis_url: str, scratch: str
) -> None:
    store = redis_stores()
    await put(store, actor="ci-deployer")
    await store.save_rollout("sentiment", started(), expected=None)
    await store.start_guard("sentiment", rollout="R1")
    await store.add_guard_delta("sentiment", delta(1, 1, n=3, k=1, canary_requests=3))

    tag = f"{{{scratch}}}"
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as raw:
        assert set(await raw.keys(f"{tag}:*")) == {
            f"{tag}:flag:sentiment", f"{tag}:flags", f"{tag}:rollout:sentiment",
            f"{tag}:guard:sentiment", f"{tag}:audit", f"{tag}:meta", f"{tag}:routes",
        }  # fmt: skip
        meta = await raw.hgetall(f"{tag}:meta")
        assert set(meta) == {"generation", "created_at"} and len(meta["generation"]) == 32
        flag = await raw.hgetall(f"{tag}:flag:sentiment")
        assert json.loads(flag.pop("doc")) == flag_document()
        assert flag.pop("updated_at")
        assert flag == {"version": "1", "updated_by": "ci-deployer"}
        assert await raw.smembers(f"{tag}:flags") == {"sentiment"}
        rollout = await raw.hgetall(f"{tag}:rollout:sentiment")
        assert Rollout.from_dict(json.loads(rollout["state"])) == started()
        assert rollout["rev"] == "1"
        assert await raw.hgetall(f"{tag}:guard:sentiment") == {
            "rollout": "R1", "test": "1", "accepts": "0", "n": "3", "k": "1", "llr": "0",
            "cn": "3", "ce": "0", "sn": "0", "se": "0", "step_from": "1", "seq:r1": "1",
        }  # fmt: skip
        [(_, fields)] = cast(list[tuple[str, dict[str, str]]], await raw.xrange(f"{tag}:audit"))
        assert set(fields) == AUDIT_FIELDS
        assert (fields["actor"], fields["version_before"], fields["version_after"]) == (
            "ci-deployer", "", "1",
        )  # fmt: skip


async def test_the_audit_stream_is_capped(
    redis_stores: Callable[..., RedisStore], redis_url: str, scratch: str
) -> None:
    store = redis_stores(audit_maxlen=100)
    for i in range(450):
        await store.record(audit_event("pause", reason=str(i)))

    async with aioredis.Redis.from_url(redis_url) as raw:
        length = await raw.xlen(Keys(scratch).audit)
    # MAXLEN ~ trims whole stream nodes (100 entries by default): never below the cap.
    assert 100 <= length <= 200, length
    assert [e.reason for e in await store.audit(limit=3)] == ["449", "448", "447"]


async def test_an_audit_filter_reads_past_one_page(
    redis_stores: Callable[..., RedisStore],
) -> None:
    store = redis_stores()
    await store.record(audit_event("resume", "rare"))
    for i in range(450):
        await store.record(audit_event("pause", "busy", reason=str(i)))

    assert [e.action for e in await store.audit(flag="rare", limit=5)] == ["resume"]
    assert len(await store.audit(flag="busy", limit=420)) == 420


# --- Redis: going away and coming back ----------------------------------------------------------


async def _each_refused(calls: dict[str, Callable[[], Awaitable[object]]], where: str) -> None:
    for name, call in calls.items():
        with pytest.raises(StoreUnavailable) as refused:
            await call()
        message = str(refused.value)
        assert message.startswith(f"flag store unavailable (Redis at {where}: "), (name, message)
        assert isinstance(refused.value.__cause__, redis.exceptions.ConnectionError), name


async def test_redis_away_refuses_writes_and_comes_back_by_itself(
    restartable_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = restartable_redis.url
    a = RedisStore(url, prefix="gw", resync_interval_s=0.2)
    b, heard = RedisStore(url, prefix="gw", resync_interval_s=0.2), Changes()
    try:
        await a.open(Changes())
        await b.open(heard)
        await put(a)
        await a.save_rollout("sentiment", started(), expected=None)
        await heard.wait_for("flag", "sentiment")

        with caplog.at_level(logging.INFO, logger="gateway.flagstore.redis"):
            await asyncio.to_thread(restartable_redis.stop)
            await _while_away(a, b, describe(url))
            await asyncio.to_thread(restartable_redis.start)
            # No write: the resync's PING brings health back, and a resync follows.
            mark = heard.mark()
            await eventually(lambda: a.healthy and b.healthy, within_s=5.0)
            await heard.wait_for("resync", "", since=mark)

        # Both subscriptions are back (Redis counts them), so a message now must reach b.
        await until_subscribed(url, Keys("gw").channel, count=2)
        got = await a.get("sentiment")
        assert got is not None  # nothing was written while away
        assert got.version == 1
        assert await a.rollout("sentiment") == started()
        mark = heard.mark()
        await put(a, if_match=1, upstream="http://127.0.0.1:9002")
        await heard.wait_for("flag", "sentiment", since=mark)  # the subscription is back

        messages = [r.getMessage() for r in caplog.records]
        assert sum("unreachable" in m for m in messages) == 2, messages  # once per store
        assert sum("reachable again" in m for m in messages) == 2, messages
    finally:
        await a.close()
        await b.close()


async def test_connections_from_before_an_outage_are_not_reused_after_it(
    restartable_redis: Any,
) -> None:
    # Not opened: no background task notices anything; only the calls below do.
    store = RedisStore(restartable_redis.url, prefix="gw")
    try:
        await put(store)
        await asyncio.gather(*(store.get("sentiment") for _ in range(8)))  # 8 pooled connections
        await asyncio.to_thread(restartable_redis.stop)
        with pytest.raises(StoreUnavailable):
            await store.get("sentiment")
        await asyncio.to_thread(restartable_redis.start)

        # Every pooled connection is used at once: none may be one the old server closed.
        got = await asyncio.gather(*(store.get("sentiment") for _ in range(8)))
        assert [g.version if g else None for g in got] == [1] * 8
        assert store.healthy
    finally:
        await store.close()


async def _while_away(a: RedisStore, b: RedisStore, where: str) -> None:
    event = audit_event("rollback")
    writes: dict[str, Callable[[], Awaitable[object]]] = {
        "put": lambda: put(a, if_match=1, upstream="http://127.0.0.1:9002"),
        "delete": lambda: a.delete("sentiment", if_match=1, event=event),
        "record": lambda: a.record(event),
        "save_rollout": lambda: a.save_rollout("sentiment", started(2.0), expected=started()),
        "add_guard_delta": lambda: a.add_guard_delta("sentiment", delta(1, 1, n=1)),
        "end_guard_test": lambda: a.end_guard_test(
            "sentiment", rollout="R1", test=1, accepted=True, new_step=False
        ),
        "start_guard": lambda: a.start_guard("sentiment", rollout="R1"),
    }
    await _each_refused(writes, where)
    with pytest.raises(StoreUnavailable, match=r"; nothing was written$"):
        await writes["put"]()
    reads: dict[str, Callable[[], Awaitable[object]]] = {
        "load": a.load,
        "get": lambda: a.get("sentiment"),
        "rollout": lambda: a.rollout("sentiment"),
        "guard_state": lambda: a.guard_state("sentiment"),
        "audit": a.audit,
    }
    await _each_refused(reads, where)
    assert not a.healthy
    await eventually(lambda: not b.healthy, within_s=5.0)  # b noticed with no write of its own


# --- Redis: lifecycle and configuration ---------------------------------------------------------


async def test_close_stops_the_background_tasks(redis_stores: Callable[..., RedisStore]) -> None:
    writer, store, heard = redis_stores(), redis_stores(resync_interval_s=0.05), Changes()
    await store.open(heard)
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert {"flagstore-subscription", "flagstore-resync"} <= names

    await store.close()
    assert not {t.get_name() for t in asyncio.all_tasks()} & {
        "flagstore-subscription", "flagstore-resync",
    }  # fmt: skip
    mark = heard.mark()
    await put(writer)
    await asyncio.sleep(0.3)  # several resync intervals: nothing may arrive after close()
    assert heard.seen[mark:] == []


async def test_open_fails_clearly_when_redis_is_not_there() -> None:
    store = RedisStore("redis://127.0.0.1:1/0")
    with pytest.raises(StoreUnavailable, match=r"Redis at 127\.0\.0\.1:1: "):
        await store.open(Changes())
    assert not store.healthy
    await store.close()


def test_urls_and_prefixes_are_checked() -> None:
    with pytest.raises(ValueError, match="unsupported Redis URL scheme 'http'"):
        RedisStore("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="without braces"):
        RedisStore("redis://127.0.0.1:6379", prefix="a{b}")
    with pytest.raises(ValueError, match="service"):
        RedisStore("redis+sentinel://127.0.0.1:26379")
    assert describe("redis://:hunter2@cache.internal:6380/0") == "cache.internal:6380"
    assert describe("redis://cache.internal") == "cache.internal:6379"
    assert describe("redis+sentinel://:pw@s1:26379,s2:26379/main/0") == (
        "sentinel s1:26379,s2:26379 service main/0"
    )
