"""Unleash's client-specification cases, run through the gateway's own assignment code.

A thin adapter maps each Unleash toggle onto the gateway: a rollout strategy becomes a flag in
`assignment: unleash` mode (salt = the strategy's groupId, canary weight = its percentage,
unit = its stickiness field) evaluated by `Assigner`; a variant list goes to `unleash_variant`
with Unleash's integer weights. Cases that hinge on what the gateway does not model (constraints,
several strategies, disabled or missing toggles, variant overrides, random stickiness that
changes the outcome) are left out of the parametrization, and counted, never skipped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import mmh3
import pytest

from gateway.core.assignment import Assigner, Role, StaticFacts, unleash_variant
from gateway.core.flags import parse_flag

SPEC_DIR = Path(__file__).parent
SPEC_FILES = sorted(SPEC_DIR.glob("[0-9][0-9]-*.json"))
ROLLOUTS = {"default", "gradualRolloutUserId", "gradualRolloutSessionId", "flexibleRollout"}
FLOOR = 50  # all 50 applicable cases of the 59; fewer means the adapter or a filter broke
UNIT_HEADER = "x-unleash-unit"


@dataclass(frozen=True)
class Case:
    file: str
    description: str
    toggle: dict[str, Any] | None
    context: dict[str, Any]
    expected: dict[str, Any]  # is_enabled: {"enabled"}; variant: {"name", "enabled", ...}

    @property
    def is_variant(self) -> bool:
        return "name" in self.expected


def load_cases() -> list[Case]:
    cases = []
    for path in SPEC_FILES:
        spec = json.loads(path.read_text(encoding="utf-8"))
        toggles = {t["name"]: t for t in spec["state"]["features"]}
        for test in spec.get("tests", []):
            expected = {"enabled": test["expectedResult"]}
            cases.append(_case(path, test, toggles, expected))
        for test in spec.get("variantTests", []):
            cases.append(_case(path, test, toggles, test["expectedResult"]))
    return cases


def _case(path: Path, test: dict[str, Any], toggles: dict[str, Any], expected: Any) -> Case:
    toggle = toggles.get(test["toggleName"])
    return Case(path.name, test["description"], toggle, test["context"], expected)


# --- the adapter ------------------------------------------------------------------------------


def rollout_of(toggle: dict[str, Any]) -> dict[str, Any]:
    """The toggle's one strategy; an enabled toggle without strategies is on for everyone."""
    strategies: list[dict[str, Any]] = toggle["strategies"] or [{"name": "default"}]
    return strategies[0]


def stickiness_value(context: dict[str, Any], stickiness: str) -> str | None:
    if stickiness == "default":  # Unleash: userId, then sessionId, then a random value
        value = context.get("userId") or context.get("sessionId")
    else:
        value = context.get(stickiness) or context.get("properties", {}).get(stickiness)
    return str(value) if value else None


def strategy_terms(toggle: dict[str, Any]) -> tuple[str, str, float]:
    """(stickiness, group id, weight) of the toggle's rollout."""
    strategy = rollout_of(toggle)
    params = strategy.get("parameters") or {}
    name = strategy["name"]
    if name == "default":
        return "default", toggle["name"], 1.0
    stickiness = {"gradualRolloutUserId": "userId", "gradualRolloutSessionId": "sessionId"}.get(
        name, params.get("stickiness") or "default"
    )
    percentage = str(params.get("percentage", params.get("rollout", "0")))
    # Unleash: flexibleRollout's group id defaults to the toggle's name, the older ones' to "".
    group = params.get("groupId") or (toggle["name"] if name == "flexibleRollout" else "")
    return stickiness, str(group), int(percentage) / 100


def is_enabled(toggle: dict[str, Any], context: dict[str, Any]) -> bool:
    """The rollout as a gateway flag in unleash mode: enabled iff the canary is chosen."""
    stickiness, group, weight = strategy_terms(toggle)
    flag = parse_flag(
        {
            "key": "spec",
            "route": {"path_prefix": "/"},
            "unit": {
                "from": "header",
                "name": UNIT_HEADER,
                # Unleash's default stickiness falls back to a random id; the others fail closed.
                "on_missing": "random" if stickiness == "default" else "stable",
            },
            "salt": group,
            "assignment": "unleash",
            "stable": {"name": "off", "upstream": "http://127.0.0.1:1"},
            "canary": {"name": "on", "upstream": "http://127.0.0.1:2"},
        }
    )
    assigner = Assigner(flag)
    unit = stickiness_value(context, stickiness)
    facts = StaticFacts(headers={UNIT_HEADER: unit} if unit else {})
    got = assigner.assign(
        assigner.unit_from(facts),
        facts,
        weight=weight,
        canary_open=True,
        rand=random.Random(0).random,
    )
    return got.role == Role.CANARY


def variant_terms(toggle: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str]:
    """(variants, group id, stickiness): the strategy's variants win over the toggle's."""
    strategy = rollout_of(toggle)
    if strategy.get("variants"):
        params = strategy.get("parameters") or {}
        return strategy["variants"], params["groupId"], params.get("stickiness") or "default"
    variants = toggle.get("variants") or []
    stickiness = (variants[0].get("stickiness") if variants else None) or "default"
    return variants, toggle["name"], stickiness


def variant_name(toggle: dict[str, Any], context: dict[str, Any]) -> str:
    variants, group, stickiness = variant_terms(toggle)
    unit = stickiness_value(context, stickiness) or random_stickiness()
    index = unleash_variant(group, unit, list(accumulate(v["weight"] for v in variants)))
    return "disabled" if index is None else str(variants[index]["name"])


def random_stickiness() -> str:
    # Only reached by cases whose answer does not depend on it (see `excluded`).
    return str(random.Random(0).randrange(1, 100_000))


def evaluate(case: Case) -> dict[str, Any]:
    assert case.toggle is not None
    enabled = is_enabled(case.toggle, case.context)
    if not case.is_variant:
        return {"enabled": enabled}
    name = variant_name(case.toggle, case.context) if enabled else "disabled"
    return {"name": name, "enabled": name != "disabled", "feature_enabled": enabled}


# --- which cases apply ------------------------------------------------------------------------


def excluded(case: Case) -> str | None:
    """Why the gateway cannot answer this case (None: it can)."""
    toggle = case.toggle
    if toggle is None:
        return "toggle missing from the state"
    if not toggle["enabled"]:
        return "toggle disabled"
    if len(toggle["strategies"]) > 1:
        return "several strategies (OR of strategies)"
    strategy = rollout_of(toggle)
    if strategy.get("constraints"):
        return "constraints"
    if strategy["name"] not in ROLLOUTS:
        return f"strategy {strategy['name']}"
    if not strategy_terms(toggle)[1]:
        return "empty groupId (a gateway salt is never empty)"
    if overridden(toggle, case.context):
        return "variant override (the gateway's unit_in rules)"
    if depends_on_random(case):
        return "random stickiness decides the outcome"
    return None


def overridden(toggle: dict[str, Any], context: dict[str, Any]) -> bool:
    for variant in toggle.get("variants") or []:
        for override in variant.get("overrides") or []:
            if stickiness_value(context, override["contextName"]) in override["values"]:
                return True
    return False


def depends_on_random(case: Case) -> bool:
    assert case.toggle is not None
    stickiness, _, weight = strategy_terms(case.toggle)
    unit = stickiness_value(case.context, stickiness)
    if stickiness == "default" and unit is None and 0 < weight < 1:
        return True
    if not case.is_variant:
        return False
    variants, _, variant_stickiness = variant_terms(case.toggle)
    unit = stickiness_value(case.context, variant_stickiness)
    return unit is None and sum(1 for v in variants if v["weight"] > 0) > 1


ALL_CASES = load_cases()
REASONS = {id(c): excluded(c) for c in ALL_CASES}
CASES = [c for c in ALL_CASES if REASONS[id(c)] is None]


def test_enough_cases_apply() -> None:
    left_out = sorted((c.file, c.description, REASONS[id(c)]) for c in ALL_CASES if REASONS[id(c)])
    print(f"\nUnleash spec: {len(CASES)} of {len(ALL_CASES)} cases run; {len(left_out)} left out:")
    for file, description, reason in left_out:
        print(f"  {file}: {description} ({reason})")
    assert len(CASES) >= FLOOR


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_unleash_case(case: Case) -> None:
    expected = {
        k: case.expected[k] for k in ("enabled", "name", "feature_enabled") if k in case.expected
    }
    assert evaluate(case) == expected


def test_the_cases_would_catch_a_signed_hash() -> None:
    """Several applicable cases come out differently under mmh3's default signed hash."""

    def wrong_value(case: Case) -> bool:
        assert case.toggle is not None
        stickiness, group, weight = strategy_terms(case.toggle)
        unit = stickiness_value(case.context, stickiness)
        if unit is None:
            return False
        signed = mmh3.hash(f"{group}:{unit}", seed=0, signed=True) % 100 + 1
        unsigned = mmh3.hash(f"{group}:{unit}", seed=0, signed=False) % 100 + 1
        percentage = round(weight * 100)
        return (percentage > 0 and signed <= percentage) != (unsigned <= percentage)

    assert sum(wrong_value(c) for c in CASES) >= 3
