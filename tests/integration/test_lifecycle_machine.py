"""The rollout lifecycle as a state machine (DESIGN 4's invariants), on both stores.

Random sequences of operator edits (PUT and DELETE with the right version, a stale one or none),
operator actions, schedule ticks, guard decisions, replica restarts and store outages, driven
through the real admin app of in-process gateways. The clock is injected: the controller reads
the machine's `now`, and a tick moves it. With Redis (a private redis-server, started by the
fixture) two gateway replicas share one store in this process; an outage makes Redis refuse
them (a password they do not have, their connections dropped) and keeps the data.

After every step:
- every stored document validates, and no two stored routes overlap;
- every flag a replica serves routes a request on its path to one of its variants;
- a rolled-back canary gets no request (not even by a `then: canary` rule) until a restart or a
  new canary, on the replica that decided it or read it at once and on every replica after a
  sync;
- no canary gets more traffic by weight than the rollout its replica knows gives it, and a
  canary or schedule that replaced the one rolling out gets none until its rollout starts;
- every transition is audited exactly once (operator writes and actions, rollbacks, blocked
  promotions, document promotions);
after a sync, additionally: replicas agree on documents, versions, rollout states and weights,
and every flag the operator created and did not delete is still served.

`make test` runs a fixed, derandomized budget; the `slow` test runs a deeper one. A failure
prints the shortest sequence hypothesis found as a replayable program.
"""

from __future__ import annotations

import asyncio
import collections
import json
import tempfile
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway.app import Gateway
from gateway.core import schedule as sched
from gateway.core.assignment import StaticFacts
from gateway.core.flags import parse_flag, routes_overlap
from gateway.core.lifecycle import (
    KEEPS,
    STARTS,
    STAYS_ROLLED_BACK,
    needs_new_rollout,
    plan_of,
    same_canary,
)
from gateway.core.schedule import Phase, Rollout
from gateway.errors import StoreUnavailable
from gateway.flagstore import MemoryStore
from gateway.flagstore.redis import RedisStore
from gateway.settings import Admin, AdminToken, Settings, Store

T = TypeVar("T")
T0 = 1_800_000_000.0
SECRET = "s3cret-operator"
PASSWORD = "outage-password"
KEYS = ("a", "b", "c")
PREFIXES = ("/a", "/b", "/shared")
STABLE = {"name": "v1", "upstream": "http://127.0.0.1:8001"}
CANARIES = (
    {"name": "v2", "upstream": "http://127.0.0.1:8002"},
    {"name": "v2", "upstream": "http://127.0.0.1:8003"},
    {"name": "v3", "upstream": "http://127.0.0.1:8002"},
)
SCHEDULES = (
    {"kind": "step", "steps": [{"weight": 0.1, "hold": "60s"}, {"weight": 1.0, "hold": "60s"}]},
    {"kind": "step", "steps": [{"weight": 0.5, "hold": "2m"}, {"weight": 1.0, "hold": "30s"}]},
)
RULES = (None, "canary", "v1")  # "v1" names the stable: a promotion of it cannot validate
UNITS = [f"u{i}" for i in range(40)]
# Sequences and steps run, for the figures a run prints (pytest -s or -rA shows them).
STATS: collections.Counter[str] = collections.Counter()
FORCE_CANARY = StaticFacts(headers={"x-canary": "always"})


def document(key: str, prefix: int, canary: int | None, schedule: int, rule_to: int) -> dict:
    doc: dict[str, Any] = {
        "key": key,
        "route": {"path_prefix": PREFIXES[prefix]},
        "stable": dict(STABLE),
        "schedule": SCHEDULES[schedule],
        "advance_requires_evidence": False,
    }
    if canary is not None:
        doc["canary"] = dict(CANARIES[canary])
    then = RULES[rule_to]
    if then is not None and (then != "canary" or canary is not None):
        doc["rules"] = [{"if": {"header": "x-canary", "equals": "always"}, "then": then}]
    return doc


documents = st.builds(
    document,
    key=st.sampled_from(KEYS),
    prefix=st.integers(0, len(PREFIXES) - 1),
    canary=st.one_of(st.none(), st.integers(0, len(CANARIES) - 1)),
    schedule=st.integers(0, len(SCHEDULES) - 1),
    rule_to=st.integers(0, len(RULES) - 1),
)

canary_documents = st.builds(
    document,
    key=st.sampled_from(KEYS),
    prefix=st.integers(0, len(PREFIXES) - 1),
    canary=st.integers(0, len(CANARIES) - 1),
    schedule=st.integers(0, len(SCHEDULES) - 1),
    rule_to=st.integers(0, len(RULES) - 1),
)


class Lifecycle(RuleBasedStateMachine):
    store_kind = "memory"
    redis_url = ""
    replica_count = 1

    def __init__(self) -> None:
        super().__init__()
        STATS["sequences"] += 1
        self.loop = asyncio.new_event_loop()
        self.now = T0
        self.prefix = f"machine-{time.monotonic_ns()}"
        self.down = False
        self.memory: MemoryStore | None = None
        self.state_dir = tempfile.TemporaryDirectory(prefix="lifecycle-")
        self.gateways: list[Gateway] = []
        self.clients: list[httpx.AsyncClient] = []
        for _ in range(self.replica_count):
            self._add_replica()
        self.created: set[str] = set()  # created by the operator and not deleted since
        self.expected: collections.Counter[tuple[str, str]] = collections.Counter()
        self.observed: dict[str, Rollout | None] = {}
        self.transitions: collections.Counter[tuple[str, str]] = collections.Counter()
        self.synced = True

    # --- plumbing ---------------------------------------------------------------------------

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def _store(self) -> MemoryStore | RedisStore:
        if self.store_kind == "memory":
            if self.memory is None:
                self.memory = MemoryStore(None)
            return self.memory
        return RedisStore(self.redis_url, prefix=self.prefix, resync_interval_s=3600)

    def _add_replica(self, at: int | None = None) -> None:
        token = AdminToken(name="ops", role="operator", secret=SECRET)
        # Each replica its own snapshot file, as on its own host; a restart reads it again.
        index = len(self.gateways) if at is None else at
        snapshot = f"{self.state_dir.name}/replica-{index}.json"
        config = Settings(
            admin=Admin(tokens=(token,)),
            store=Store(
                kind=self.store_kind, flags_file=None, flush_interval_s=3600, snapshot_file=snapshot
            ),
            controller_interval_s=3600,  # the machine ticks; no background clock
        )
        gateway = Gateway(config, store=self._store(), clock=lambda: self.now)
        self.run(gateway.start())
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway.admin_app),
            base_url="http://admin",
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        if at is None:
            self.gateways.append(gateway)
            self.clients.append(client)
        else:
            self.gateways[at], self.clients[at] = gateway, client

    def teardown(self) -> None:
        if self.down:
            self._recover()
        for gateway, client in zip(self.gateways, self.clients, strict=True):
            self.run(client.aclose())
            self.run(gateway.stop())
        if self.store_kind == "redis":
            admin = redis.Redis.from_url(self.redis_url)
            keys = list(admin.scan_iter(match=f"{{{self.prefix}}}:*"))
            if keys:
                admin.delete(*keys)
            admin.close()
        self.loop.close()
        self.state_dir.cleanup()

    def call(self, replica: int, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.run(self.clients[replica].request(method, path, **kwargs))

    def stored(self, key: str) -> tuple[int, dict[str, Any]] | None:
        """The store's version and document of `key` (None: absent), as GET answers them."""
        response = self.call(0, "GET", f"/admin/flags/{key}")
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        body = response.json()
        return body["version"], body["document"]

    def rollout(self, key: str) -> Rollout | None:
        for _ in range(5):  # a pooled connection dropped in an outage fails once (as _recover)
            try:
                return self.run(self.gateways[0].store.rollout(key))
            except StoreUnavailable:
                if self.down:
                    raise
        return self.run(self.gateways[0].store.rollout(key))

    def settle(self) -> None:
        """Let announced changes and spawned writes finish (both happen after a write returns)."""
        for gateway in self.gateways:
            self.run(gateway.controller.drain())
        self.run(asyncio.sleep(0.01))

    def tick_all(self) -> None:
        for gateway in self.gateways:
            try:
                self.run(gateway.controller.tick())
            except StoreUnavailable:
                assert self.down
            if not self.down:
                # One replica's tick may move a rollout the next one moves again (a promotion
                # refused, then a rollback decided during an outage written): see each.
                self._observe()

    # --- operator edits ---------------------------------------------------------------------

    @initialize(doc=canary_documents)
    def first_flag(self, doc: dict[str, Any]) -> None:
        response = self.call(0, "PUT", f"/admin/flags/{doc['key']}", json=doc)
        assert response.status_code == 201, response.text
        self.created.add(doc["key"])
        self.expected[(doc["key"], "create")] += 1
        self.settle()
        self.tick_all()

    @rule(
        doc=documents,
        version=st.sampled_from(["right", "stale", "none"]),
        replica=st.data(),
        tick_now=st.booleans(),
    )
    def put(
        self, doc: dict[str, Any], version: str, replica: st.DataObject, tick_now: bool
    ) -> None:
        """`tick_now`: the replica's controller steps right after the answer (and the answer's
        word on the rollout is checked); else the invariants see the edit before any step."""
        r = replica.draw(st.integers(0, len(self.gateways) - 1), label="replica")
        key = doc["key"]
        current = None if self.down else self.stored(key)
        headers = {}
        if version == "right" and current is not None:
            headers["If-Match"] = str(current[0])
        elif version == "stale":
            headers["If-Match"] = str(current[0] + 1 if current else 7)
        before = self.rollout(key) if not self.down and current else None
        response = self.call(r, "PUT", f"/admin/flags/{key}", json=doc, headers=headers)
        status = response.status_code
        self.synced = False
        if self.down:
            assert status == 503, response.text
            return
        assert not (current is not None and status == 201), "201 for a key that existed"
        if current is not None and "If-Match" not in headers:
            assert status in (428, 422), response.text  # 422: the document itself is refused
        elif current is None:
            assert status in ((201, 422) if "If-Match" not in headers else (409, 422)), status
        elif version == "stale":
            assert status in (409, 422), response.text
        else:
            assert status in (200, 422), response.text
        if status not in (200, 201):
            return
        self.created.add(key)
        self.expected[(key, "create" if status == 201 else "replace")] += 1
        # With two replicas, always: a flag deleted and created again with the same document
        # before the other replica heard of the delete keeps that replica's old runtime until
        # a controller step starts the new rollout (its weight and state converge then).
        if tick_now or self.replica_count > 1:
            self._check_consequence(r, doc, response.json()["rollout"], before)
        else:
            self.settle()

    def _check_consequence(
        self, r: int, doc: dict[str, Any], said: str, before: Rollout | None
    ) -> None:
        """What the answer said the edit does to the rollout is what the controller does."""
        self.settle()
        try:
            self.run(self.gateways[r].controller.tick())
        except StoreUnavailable:
            return
        key = doc["key"]
        after = self.rollout(key)
        self._observe()
        if said == STAYS_ROLLED_BACK:
            assert after is not None and after.phase is Phase.ROLLED_BACK, after
        elif said == STARTS:
            assert after is not None and after.plan == plan_of(parse_flag(doc)), after
            assert after.started_at == self.now and after.reason == "start", (before, after)
        elif said == KEEPS and before is not None and after is not None:
            assert after.started_at == before.started_at, (before, after)

    @rule(key=st.sampled_from(KEYS), version=st.sampled_from(["right", "stale", "none"]))
    def delete(self, key: str, version: str) -> None:
        current = None if self.down else self.stored(key)
        headers = {}
        if version != "none":
            right = current[0] if current else 1
            headers["If-Match"] = str(right if version == "right" else right + 1)
        response = self.call(0, "DELETE", f"/admin/flags/{key}", headers=headers)
        self.synced = False
        if self.down:
            assert response.status_code == (428 if version == "none" else 503), response.text
            return
        if current is None:
            assert response.status_code in (404, 428), response.text
        elif version == "none":
            assert response.status_code == 428, response.text
        elif version == "stale":
            assert response.status_code == 409, response.text
        else:
            assert response.status_code == 204, response.text
            self.created.discard(key)
            self.expected[(key, "delete")] += 1

    # --- operator actions, the clock, the guard ---------------------------------------------

    @rule(
        key=st.sampled_from(KEYS),
        action=st.sampled_from(["pause", "resume", "promote", "rollback", "restart"]),
        replica=st.data(),
    )
    def act(self, key: str, action: str, replica: st.DataObject) -> None:
        r = replica.draw(st.integers(0, len(self.gateways) - 1), label="replica")
        reason = f"{action} by the machine"
        response = self.call(r, "POST", f"/admin/flags/{key}/{action}", json={"reason": reason})
        self.synced = False
        status = response.status_code
        assert status in (200, 404, 409, 503), response.text
        if self.down:
            assert status in (404, 409, 503), response.text
        if status == 200:
            self.expected[(key, f"ops:{action}")] += 1
            assert self.rollout(key).reason == reason  # type: ignore[union-attr]
        self.settle()

    @rule(seconds=st.sampled_from([1.0, 30.0, 61.0, 200.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.tick_all()
        self.synced = False

    @rule(key=st.sampled_from(KEYS), replica=st.data())
    def guard_rejects(self, key: str, replica: st.DataObject) -> None:
        r = replica.draw(st.integers(0, len(self.gateways) - 1), label="replica")
        flag = self.gateways[r].router.by_key.get(key)
        if flag is None or flag.guard is None or not flag.canary_open:
            return
        guard = flag.guard

        async def canary_errors() -> None:  # on the loop, as the request path calls it
            for _ in range(1000):
                if guard.tripped:
                    return
                guard.observe(True)

        self.run(canary_errors())
        assert guard.tripped and not flag.canary_open  # closed before observe returned
        self.settle()
        self.synced = False

    # --- replicas and the store -------------------------------------------------------------

    @precondition(lambda self: self.store_kind == "redis")
    @rule(replica=st.data())
    def restart_replica(self, replica: st.DataObject) -> None:
        r = replica.draw(st.integers(0, len(self.gateways) - 1), label="replica")
        self.run(self.clients[r].aclose())
        self.run(self.gateways[r].stop())
        try:
            self._add_replica(at=r)  # while Redis is away, from the replica's snapshot
        except StoreUnavailable:
            assert self.down
            self._recover()
            self._add_replica(at=r)
        self.synced = False

    @precondition(lambda self: self.store_kind == "redis" and not self.down)
    @rule()
    def outage(self) -> None:
        admin = redis.Redis.from_url(self.redis_url)
        admin.config_set("requirepass", PASSWORD)
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        admin.close()
        self.down = True

    @precondition(lambda self: self.down)
    @rule()
    def recover(self) -> None:
        self._recover()
        self.tick_all()  # decisions taken while away are written now
        self.settle()

    def _recover(self) -> None:
        admin = redis.Redis.from_url(self.redis_url, password=PASSWORD)
        admin.config_set("requirepass", "")
        admin.close()
        self.down = False
        for gateway in self.gateways:
            # A pooled connection dropped during the outage fails its next command once (no
            # command is retried, so none runs twice): let each replica notice that here.
            for _ in range(3):
                try:
                    self.run(gateway.store.load())
                    break
                except StoreUnavailable:
                    continue

    @precondition(lambda self: not self.down)
    @rule()
    def sync(self) -> None:
        for gateway in self.gateways:
            self.run(gateway.on_change("resync", ""))
        self.settle()
        self.synced = True
        first = self.gateways[0]
        for key in self.created:
            assert key in first.router.by_key, f"flag {key} lost its route"
        for other in self.gateways[1:]:
            ours, theirs = _view(first), _view(other)
            differ = {
                k: (ours.get(k), theirs.get(k))
                for k in {*ours, *theirs}
                if ours.get(k) != theirs.get(k)
            }
            assert not differ, differ

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def stored_documents_validate(self) -> None:
        STATS["checks"] += 1  # once per step, and once before the first
        if self.down:
            return
        flags = [parse_flag(doc) for doc in self._raw_documents()]
        for i, flag in enumerate(flags):
            for other in flags[:i]:
                assert not routes_overlap(flag.route, other.route), (flag.key, other.key)

    def _raw_documents(self) -> list[dict[str, Any]]:
        if self.memory is not None:
            return [entry.document for entry in self.run(self.memory.load())]
        admin = redis.Redis.from_url(self.redis_url, decode_responses=True)
        docs = [
            json.loads(admin.hget(f"{{{self.prefix}}}:flag:{key}", "doc") or "null")
            for key in admin.smembers(f"{{{self.prefix}}}:flags")
        ]
        admin.close()
        return [d for d in docs if d is not None]

    @invariant()
    def every_served_flag_routes(self) -> None:
        for gateway in self.gateways:
            for flag in gateway.router:
                matched = gateway.router.match(flag.prefix or "/", None, "POST")
                assert matched is flag, (flag.key, matched and matched.key)
                for unit in UNITS[:5]:
                    got = flag.assigner.assign(
                        unit,
                        FORCE_CANARY,
                        weight=flag.weight,
                        canary_open=flag.canary_open,
                        rand=lambda: 0.5,
                    )
                    assert got.variant in flag.arms, (flag.key, got.variant)

    @invariant()
    def rolled_back_canary_gets_nothing(self) -> None:
        for gateway in self.gateways:
            for flag in gateway.router:
                if flag.canary is None or not self._rolled_back_for(gateway, flag.key):
                    continue
                for unit in UNITS:
                    for facts in (FORCE_CANARY, StaticFacts()):
                        got = flag.assigner.assign(
                            unit,
                            facts,
                            weight=flag.weight,
                            canary_open=flag.canary_open,
                            rand=lambda: 0.5,
                        )
                        assert got.variant != flag.canary.name, (flag.key, unit)

    @invariant()
    def a_replica_serves_the_rollout_it_knows(self) -> None:
        """No canary gets more traffic by weight than the rollout its replica last read or wrote
        gives it (a rollout of a canary or schedule the document has replaced since: none)."""
        for gateway in self.gateways:
            for flag in gateway.router:
                known = gateway.controller.rollout(flag.key)
                if flag.canary is None or known is None:
                    continue
                plan = plan_of(flag.flag)
                if needs_new_rollout(known.plan, plan, known.phase):
                    assert flag.weight == 0.0, (flag.key, flag.weight, known)
                elif not flag.canary_open or known.phase is Phase.ROLLED_BACK:
                    assert flag.weight == 0.0 and not flag.canary_open, (flag.key, known)
                else:
                    most = sched.weight(flag.flag.schedule, known, self.now)
                    assert flag.weight <= most, (flag.key, flag.weight, most, known)

    def _rolled_back_for(self, gateway: Gateway, key: str) -> bool:
        flag = gateway.router.by_key[key]
        if gateway.controller.rollback_pending(key):
            return True
        views = [gateway.controller.rollout(key)]
        if self.synced and not self.down:
            views.append(self.rollout(key))
        return any(
            r is not None
            and r.phase is Phase.ROLLED_BACK
            and same_canary(r.plan, plan_of(flag.flag))
            for r in views
        )

    @invariant()
    def each_transition_is_audited_once(self) -> None:
        if self.down:
            return
        self._observe()
        for key in KEYS:
            events = self.run(self.gateways[0].store.audit(flag=key, limit=1000))
            seen = collections.Counter(
                (e.action if e.actor != "ops" or e.action in ("create", "replace", "delete")
                 else f"ops:{e.action}")
                for e in events
            )  # fmt: skip
            for what in ("create", "replace", "delete", *(f"ops:{a}" for a in ACTIONS)):
                assert seen[what] == self.expected[(key, what)], (key, what, seen)
            rollbacks = sum(1 for e in events if e.action == "rollback")
            assert rollbacks == self.transitions[(key, "rolled_back")], (key, events)
            blocked = sum(1 for e in events if e.action == "promotion_blocked")
            assert blocked == self.transitions[(key, "blocked")], (key, events)
            # A deleted and re-created flag starts again at version 1, so a promotion is
            # identified by the flag's incarnation (creates so far) and the version it replaced.
            promoted = []
            incarnation = 0
            for e in reversed(events):  # newest first from both stores
                incarnation += e.action == "create"
                if e.action == "promote" and e.actor == "controller":
                    promoted.append((incarnation, e.version_before))
            assert len(promoted) == len(set(promoted)), (key, events)

    def _observe(self) -> None:
        """Count rollout transitions into rolled_back and into a refused promotion."""
        for key in KEYS:
            now = self.rollout(key)
            was = self.observed.get(key)
            self.observed[key] = now
            if now is None:
                continue
            fresh = was is None or was.started_at != now.started_at
            if now.phase is Phase.ROLLED_BACK and (fresh or was.phase is not Phase.ROLLED_BACK):
                self.transitions[(key, "rolled_back")] += 1
            if now.reason == "promotion_blocked" and (fresh or was.reason != now.reason):
                self.transitions[(key, "blocked")] += 1


ACTIONS = ("pause", "resume", "promote", "rollback", "restart")


def _view(gateway: Gateway) -> dict[str, Any]:
    """What a replica serves: documents, versions, rollout states and weights."""
    view = {}
    for flag in gateway.router:
        rollout = gateway.controller.rollout(flag.key)
        # weight and canary_open mean something only while there is a canary
        serving = (flag.weight, flag.canary_open) if flag.canary is not None else None
        view[flag.key] = (flag.version, flag.flag, rollout, serving)
    return view


def _run(machine: type[Lifecycle], examples: int, steps: int, *, derandomize: bool) -> None:
    STATS.clear()
    started = time.monotonic()
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            derandomize=derandomize,
            deadline=None,
            database=None,
            print_blob=True,  # a failure also prints @reproduce_failure to replay it exactly
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    sequences = STATS["sequences"]
    print(
        f"{machine.__name__}: {sequences} sequences, {STATS['checks'] - sequences} steps, "
        f"{time.monotonic() - started:.1f} s"
    )


class MemoryLifecycle(Lifecycle):
    store_kind = "memory"
    replica_count = 1


def redis_machine(url: str) -> type[Lifecycle]:
    attributes = {"store_kind": "redis", "redis_url": url, "replica_count": 2}
    return type("RedisLifecycle", (Lifecycle,), attributes)


def test_lifecycle_on_the_memory_store() -> None:
    _run(MemoryLifecycle, examples=30, steps=30, derandomize=True)


def test_lifecycle_on_redis_with_two_replicas(restartable_redis: Any) -> None:
    _run(redis_machine(restartable_redis.url), examples=15, steps=25, derandomize=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lifecycle_deeper(restartable_redis: Any) -> None:
    """Longer sequences, and new ones on every run (a failure prints its sequence)."""
    _run(MemoryLifecycle, examples=100, steps=50, derandomize=False)
    _run(redis_machine(restartable_redis.url), examples=30, steps=40, derandomize=False)


class _Replica:
    """Stands for the `replica` draw of a rule when a sequence is replayed by hand."""

    def __init__(self, index: int) -> None:
        self.index = index

    def draw(self, strategy: Any, label: str | None = None) -> int:
        return self.index


def _check(machine: Lifecycle) -> None:
    machine.stored_documents_validate()
    machine.every_served_flag_routes()
    machine.rolled_back_canary_gets_nothing()
    machine.a_replica_serves_the_rollout_it_knows()
    machine.each_transition_is_audited_once()


@pytest.mark.parametrize("rule_to", [0, 2], ids=["promotable", "promotion-refused"])
def test_a_rollback_decided_offline_is_written_before_its_canary_moves_on(
    restartable_redis: Any, rule_to: int
) -> None:
    """Found by the deeper run. A replica rejects the canary while Redis is away and restarts
    from its snapshot; the canary's promotion falls due meanwhile. When Redis returns, the first
    write of the rollback fails on a connection the outage dropped. The replica then promoted
    the canary it had rejected (or, with a rule naming `v1`, tried to: the promotion was refused)
    before the next tick wrote the rollback over it."""
    machine = redis_machine(restartable_redis.url)()
    try:
        machine.first_flag(doc=document(key="a", prefix=0, canary=0, schedule=0, rule_to=rule_to))
        for step in (machine.outage, lambda: machine.tick(61.0), machine.recover,
                     machine.outage, machine.recover, machine.outage,
                     lambda: machine.tick(61.0), lambda: machine.tick(1.0),
                     lambda: machine.guard_rejects("a", _Replica(0)),  # type: ignore[arg-type]
                     lambda: machine.restart_replica(_Replica(0)),  # type: ignore[arg-type]
                     machine.recover):  # fmt: skip
            step()
            _check(machine)
        rollout = machine.rollout("a")
        assert rollout is not None and rollout.phase is Phase.ROLLED_BACK, rollout
        events = machine.run(machine.gateways[0].store.audit(flag="a", limit=100))
        assert [e.action for e in events if "promot" in e.action] == [], events
        stored = machine.stored("a")
        assert stored is not None and stored[1]["stable"]["name"] == "v1", stored
        assert stored[1]["canary"]["name"] == "v2", stored
    finally:
        machine.teardown()


@pytest.mark.parametrize("action", ["promote", "pause"])
def test_an_operator_action_meets_the_rollback_decided_before_it(
    restartable_redis: Any, action: str
) -> None:
    """The guard rejects the canary while Redis is away; an operator acts on the same replica
    once Redis is back, before any tick. The rollback is written first, so the action is refused
    (409: a rolled-back rollout cannot be promoted or paused) instead of overriding the guard."""
    machine = redis_machine(restartable_redis.url)()
    try:
        machine.first_flag(doc=document(key="a", prefix=0, canary=0, schedule=0, rule_to=0))
        machine.outage()
        machine.guard_rejects("a", _Replica(0))  # type: ignore[arg-type]
        machine._recover()  # no tick: the rollback is still only decided
        assert machine.gateways[0].controller.rollback_pending("a")
        response = machine.call(0, "POST", f"/admin/flags/a/{action}", json={"reason": "ops"})
        assert response.status_code == 409, response.text
        rollout = machine.rollout("a")
        assert rollout is not None and rollout.phase is Phase.ROLLED_BACK, rollout
        assert rollout.reason == "sprt", rollout
        _check(machine)
    finally:
        machine.teardown()


def test_a_replica_that_reads_the_rollout_of_another_canary_stops_its_own(
    restartable_redis: Any,
) -> None:
    """Found by the deeper run. Replica 1 has not applied the change message of a promotion
    yet (it waits for the replica's lock here, as behind a long step), so it still serves the
    canary at the weight it had. It then reads the flag's rollout, which now rolls out no
    canary: the canary it serves belongs to no rollout it knows, and gets nothing by weight
    until its own rollout starts or the promoted document arrives."""
    machine = redis_machine(restartable_redis.url)()
    try:
        machine.first_flag(doc=document(key="b", prefix=0, canary=0, schedule=0, rule_to=0))
        lagging = machine.gateways[1]
        assert lagging.router.by_key["b"].weight == 0.1
        machine.run(lagging.controller.lock.acquire())  # its change messages wait
        machine.now += 200.0
        for _ in range(2):  # promoted (the document loses its canary), then its plan forgotten
            machine.run(machine.gateways[0].controller.tick())
            machine.settle()
        stored = machine.stored("b")
        assert stored is not None and "canary" not in stored[1], stored
        machine.run(lagging.controller.refresh("b"))  # a rollout message, say
        assert lagging.router.by_key["b"].canary is not None  # the promotion not applied yet
        machine.a_replica_serves_the_rollout_it_knows()
        lagging.controller.lock.release()
        machine.sync()  # replicas agree, and every invariant holds
        _check(machine)
    finally:
        machine.teardown()
