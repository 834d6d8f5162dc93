"""The flag store interface both stores implement, and the records they keep.

What a store keeps, per flag: the operator's document with an integer `version` (writes are
compare-and-set on it), the rollout state apart from the document (so an edit never clobbers
progress), and the guard's fleet-wide state (test index and counts). Besides: an audit trail
of every write and operator action. A store tells the gateway about changes through the
`on_change` callback given to `open()`; the Redis store also re-syncs on a timer so a lost
message is repaired.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from gateway.core.flags import Flag, parse_flag
from gateway.core.paired import RunningStats
from gateway.core.schedule import Rollout
from gateway.core.totals import Totals
from gateway.errors import FieldError, InvalidDocument

ChangeKind = Literal["flag", "rollout", "guard", "resync"]
OnChange = Callable[[ChangeKind, str], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class StoredFlag:
    """A flag as the operator wrote it (`document`), parsed (`flag`), at `version`."""

    flag: Flag
    document: dict[str, Any]
    version: int

    @property
    def key(self) -> str:
        return self.flag.key


def validated(flag: Flag, document: dict[str, Any]) -> Flag:
    """`document` checked as an operator's PUT is, whoever writes it (the controller too):
    a store never holds a document that does not validate. Raises InvalidDocument."""
    parsed = parse_flag(document)
    if parsed.key != flag.key:
        message = f"must equal the flag's key ({flag.key!r}), got {parsed.key!r}"
        raise InvalidDocument([FieldError("key", message)])
    return parsed


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited write or action. `actor` is a token's name, never its secret."""

    ts: float
    actor: str
    action: str  # create | replace | delete | rollback | promote | pause | resume | restart | ...
    flag: str
    version_before: int | None = None
    version_after: int | None = None
    diff: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class GuardState:
    """One flag's fleet-wide guard state (DESIGN 5): which test of which rollout, and its counts.

    `rollout` names the rollout the state belongs to ('' = none yet) and `test` is the test
    index i (1 + the tests this rollout has ended); together they version the counts, so a delta
    for an older test or an older rollout is dropped. n, k and llr are the current test's (in
    relative mode n counts errors of either arm, k those of the canary, and llr is the sum of
    the per-error increments; in absolute mode llr stays 0 and is computed from n and k).
    The four arm counts are the current step's requests and errors per arm, counted since test
    `step_from` began; relative mode takes q from them.
    """

    rollout: str = ""
    test: int = 1
    accepts: int = 0
    n: int = 0
    k: int = 0
    llr: float = 0.0
    canary_requests: int = 0
    canary_errors: int = 0
    stable_requests: int = 0
    stable_errors: int = 0
    step_from: int = 1


@dataclass(frozen=True, slots=True)
class GuardDelta:
    """What one replica counted since its last flush, sent at most once per (replica, seq).

    A replica numbers its deltas 1, 2, ... and resends an unanswered one unchanged, with the
    same seq, before any newer one; the store applies a delta only when its seq is above the
    last one applied for that replica, so a lost reply never makes it count twice. The trial
    counts (n, k, llr) are added only when `test` is the current test; the arm counts whenever
    `test` belongs to the current step (step_from <= test <= current test).
    """

    replica: str
    seq: int
    rollout: str
    test: int
    n: int = 0
    k: int = 0
    llr: float = 0.0
    canary_requests: int = 0
    canary_errors: int = 0
    stable_requests: int = 0
    stable_errors: int = 0


class FlagStore(Protocol):
    kind: str  # "memory" | "redis"

    @property
    def healthy(self) -> bool:
        """False while the backing service is unreachable (writes are refused then)."""
        ...

    async def open(self, on_change: OnChange) -> None:
        """Connect, subscribe to changes, and call `on_change` for every later change."""
        ...

    async def load(self) -> list[StoredFlag]:
        """Every flag document, in a stable order (by key)."""
        ...

    async def get(self, key: str) -> StoredFlag | None: ...

    async def put(
        self, flag: Flag, document: dict[str, Any], *, if_match: int | None, event: AuditEvent
    ) -> StoredFlag:
        """Create (if_match None: the flag must not exist) or replace (if_match = the current
        version) atomically, appending `event` (with version_before/after filled in) to the
        audit and announcing the change. Raises PreconditionRequired when replacing without
        if_match, ConflictError on a stale version, InvalidDocument when `document` does not
        validate or its route overlaps another flag's (checked in the same atomic step as the
        compare-and-set), StoreUnavailable when the store is away."""
        ...

    async def delete(self, key: str, *, if_match: int, event: AuditEvent) -> None:
        """Delete at `if_match` (ConflictError when stale, NotFoundError when absent)."""
        ...

    async def audit(self, *, flag: str | None = None, limit: int = 100) -> list[AuditEvent]:
        """Newest first."""
        ...

    async def record(self, event: AuditEvent) -> None:
        """Append an operator action or a guard decision to the audit."""
        ...

    async def rollout(self, key: str) -> Rollout | None:
        """The persisted rollout state of a flag, if its rollout has started."""
        ...

    async def save_rollout(
        self,
        key: str,
        rollout: Rollout,
        *,
        expected: Rollout | None,
        event: AuditEvent | None = None,
    ) -> bool:
        """Compare-and-set the rollout state (announced to every replica; `event`, if any, is
        audited in the same step). False when the stored state is not `expected`."""
        ...

    async def guard_state(self, key: str) -> GuardState:
        """The fleet-wide guard state of a flag (GuardState() when there is none)."""
        ...

    async def add_guard_delta(self, key: str, delta: GuardDelta) -> GuardState:
        """Apply a replica's delta at most once (see GuardDelta) and return the state after."""
        ...

    async def end_guard_test(
        self, key: str, *, rollout: str, test: int, accepted: bool, new_step: bool
    ) -> GuardState:
        """If the stored state is test `test` of `rollout`, start test + 1 at zero (counting an
        acceptance when `accepted`; a new step also zeroes the arm counts); returns the state
        now. Whoever ends a test first wins; the others get the new test back."""
        ...

    async def start_guard(self, key: str, *, rollout: str) -> GuardState:
        """If the stored state is not `rollout`'s, start its test 1 at zero; returns the state."""
        ...

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
        """Merge this replica's pending (n, mean, M2) of d, its unmeasured count and its
        latest always-valid p-value into the fleet-wide `Totals` of (key, shadow, metric)
        atomically (`Totals.merge`), and keep the pair lines (capped); returns the totals."""
        ...

    async def shadow_pairs(self, key: str, shadow: str) -> list[str] | None:
        """The pair lines the store keeps for (key, shadow), oldest first; None when it keeps
        none (one process: its own pairs are all there are)."""
        ...

    async def close(self) -> None: ...
