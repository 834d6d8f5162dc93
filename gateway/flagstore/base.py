"""The flag store interface both stores implement, and the records they keep.

What a store keeps, per flag: the operator's document with an integer `version` (writes are
compare-and-set on it), the rollout state apart from the document (so an edit never clobbers
progress), and the guard's fleet-wide counts. Besides: an audit trail of every write and
operator action. A store tells the gateway about changes through the `on_change` callback
given to `open()`; the Redis store also re-syncs on a timer so a lost message is repaired.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from gateway.core.flags import Flag
from gateway.core.paired import RunningStats
from gateway.core.schedule import Rollout

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
class GuardCounts:
    """Fleet-wide guard counts for one flag within one guard epoch.

    The epoch changes when the test restarts (H0 accepted, new rollout): deltas counted under
    an old epoch are dropped instead of polluting the new test.
    """

    n: int = 0
    k: int = 0
    epoch: int = 0


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
        if_match, ConflictError on a stale version, StoreUnavailable when the store is away."""
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

    async def add_guard_counts(self, key: str, n: int, k: int, *, epoch: int) -> GuardCounts:
        """Add this replica's deltas to the fleet-wide counts (ignored if `epoch` is not the
        current one) and return the fleet-wide counts after the addition."""
        ...

    async def reset_guard(self, key: str, *, epoch: int) -> GuardCounts:
        """Start a new guard epoch at n = k = 0 if the current epoch is `epoch`; returns the
        counts now (whoever reset first wins)."""
        ...

    async def merge_shadow_stats(
        self, key: str, shadow: str, pending: RunningStats, lines: list[str]
    ) -> RunningStats:
        """Merge this replica's pending (n, mean, M2) of d into the fleet-wide one (Chan's
        formula, atomically) and keep the pair lines (capped); returns the merged stats."""
        ...

    async def close(self) -> None: ...
