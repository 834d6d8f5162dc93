"""What the admin port needs from a replica, as Protocols: the seam between `admin` and `app`.

The admin routes and the health endpoints take these instead of the `Gateway` class, so the
admin package never imports `gateway.app` (which builds the admin app and so imports this
package): imports point one way, `admin` <- `app`. `Gateway` satisfies both Protocols as it is;
a test may pass anything else that does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gateway.control.runtime import FlagRuntime
    from gateway.control.shadow import Mirror
    from gateway.core.schedule import Rollout
    from gateway.flagstore import FlagStore, StoredFlag
    from gateway.flagstore.base import ChangeKind
    from gateway.settings import Settings


class RolloutControl(Protocol):
    """The rollout controller as the admin API sees it: read a flag's rollout, act on it."""

    def rollout(self, key: str) -> Rollout | None:
        """The rollout state this replica last saw for `key` (None: none yet, or deleted)."""

    def rollback_pending(self, key: str) -> bool:
        """True while a rollback of `key` is decided here but not yet written to the store."""

    async def act(self, key: str, action: str, *, actor: str, reason: str) -> Rollout:
        """Apply an operator action; NotFoundError or IllegalTransition when it cannot."""


class AdminGateway(Protocol):
    """The replica behind the `/admin` routes."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> FlagStore: ...

    @property
    def mirror(self) -> Mirror: ...

    @property
    def controller(self) -> RolloutControl: ...

    def flag(self, key: str) -> FlagRuntime | None:
        """The flag as this replica serves it (its snapshot), or None."""

    def stale_age(self) -> float | None:
        """Seconds since the snapshot was confirmed while the store is away (NaN: never);
        None while the store answers."""

    def snapshot_flags(self) -> list[StoredFlag] | None:
        """The flags as this replica last read them from a shared store (None: no shared
        store, so no snapshot to serve reads from during an outage)."""

    async def on_change(self, kind: ChangeKind, key: str) -> None:
        """Apply a change to this replica's snapshot now (read-your-writes)."""


@dataclass(frozen=True, slots=True)
class Readiness:
    """The replica's state as `/readyz` reports it."""

    ready: bool
    flags: int
    store_up: bool
    in_flight: int
    mirrors_in_flight: int
    # flags whose latest change this replica could not apply (key -> why): it serves the previous
    snapshot_problems: dict[str, str] = field(default_factory=dict)


class HealthGateway(Protocol):
    """The replica behind `/healthz`, `/readyz` and `/metrics`."""

    @property
    def registry(self) -> CollectorRegistry: ...

    def readiness(self) -> Readiness: ...

    def observe_store(self) -> None:
        """Set the flag-store gauges (up, sync age) to their values now, before a scrape."""
