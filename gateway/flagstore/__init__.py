"""Where flag documents and rollout state live: embedded memory (default) or Redis."""

from gateway.flagstore.base import AuditEvent, FlagStore, GuardDelta, GuardState, StoredFlag
from gateway.flagstore.memory import MemoryStore, read_flags_file

__all__ = [
    "AuditEvent",
    "FlagStore",
    "GuardDelta",
    "GuardState",
    "MemoryStore",
    "StoredFlag",
    "read_flags_file",
]
