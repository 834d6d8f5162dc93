"""The rollout lifecycle's document rules (DESIGN 4): what an edit does to a rollout, and the
document a promotion writes.

A rollout rolls out a *plan*: the canary (name, upstream, transport) and the schedule. The plan
is kept as two fingerprints, `<canary>:<schedule>`, so the controller and the admin API can tell
a new canary from a schedule edit:

- a new canary (name or upstream) always starts a new rollout;
- a schedule edit starts a new rollout of a running or paused one, but a rolled-back rollout
  stays rolled back until an operator `restart` (or a new canary);
- any other edit keeps the rollout where it is.

`consequence` says which, in the words every PUT answer, audit event and `apply --dry-run` use.
`promoted_document` is the document a promotion writes: the canary becomes `stable`, `canary`
is removed, the schedule is kept, and rules that named the canary (its role or its name) name
`stable`. The caller validates the result like any operator's document before storing it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Final, Literal

from gateway.core.flags import Flag
from gateway.core.schedule import Phase

KEEPS: Final = "keeps"
STARTS: Final = "starts a new rollout"
STAYS_ROLLED_BACK: Final = "stays rolled back"
Consequence = Literal["keeps", "starts a new rollout", "stays rolled back"]


def _fingerprint(what: object) -> str:
    text = json.dumps(what, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def plan_of(flag: Flag) -> str:
    """`<canary>:<schedule>` fingerprints of what a rollout rolls out; "" without a canary."""
    if flag.canary is None:
        return ""
    canary = _fingerprint(flag.canary.model_dump())
    return f"{canary}:{_fingerprint(flag.schedule.model_dump())}"


def same_canary(plan_a: str, plan_b: str) -> bool:
    """Both plans roll out the same canary (a plan without the two parts matches only itself)."""
    if ":" not in plan_a or ":" not in plan_b:
        return plan_a == plan_b
    return plan_a.split(":", 1)[0] == plan_b.split(":", 1)[0]


def needs_new_rollout(stored_plan: str, plan: str, phase: Phase) -> bool:
    """Whether a rollout of `stored_plan` in `phase` is replaced by a new one of `plan`."""
    if stored_plan == plan or plan == "":
        return False
    if not same_canary(stored_plan, plan):
        return True
    return phase in (Phase.RUNNING, Phase.PAUSED)


def consequence(
    before: Flag | None, after: Flag, phase: Phase | None, *, rolling: str | None = None
) -> Consequence:
    """What storing `after` over `before` does to the rollout now in `phase` (None: none yet).

    `rolling` is the plan that rollout rolls out, where known: the controller judges an edit
    against it, and it can differ from `before`'s plan when edits came faster than a tick.
    """
    plan = plan_of(after)
    if plan == "":
        return KEEPS  # no canary: nothing rolls out
    if before is None or phase is None:
        return STARTS
    old = plan_of(before) if rolling is None else rolling
    if old == "" or needs_new_rollout(old, plan, phase):
        return STARTS
    if phase is Phase.ROLLED_BACK:
        return STAYS_ROLLED_BACK
    return KEEPS


def promoted_document(document: dict[str, Any]) -> dict[str, Any]:
    """The document after promoting its canary; `document` is left as it was."""
    promoted = copy.deepcopy(document)
    canary = promoted.pop("canary", None)
    if canary is None:
        return promoted
    promoted["stable"] = canary
    name = canary.get("name") if isinstance(canary, dict) else None
    for rule in promoted.get("rules") or []:
        if isinstance(rule, dict) and rule.get("then") in ("canary", name):
            rule["then"] = "stable"
    return promoted
