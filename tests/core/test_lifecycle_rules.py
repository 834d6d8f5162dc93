"""The lifecycle's document rules: the promoted document, and what an edit does to a rollout."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from gateway.core.documents import load_yaml
from gateway.core.flags import parse_flag, parse_flag_set
from gateway.core.lifecycle import (
    KEEPS,
    STARTS,
    STAYS_ROLLED_BACK,
    consequence,
    needs_new_rollout,
    plan_of,
    promoted_document,
)
from gateway.core.schedule import Phase

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [ROOT / "config" / "flags.yaml", ROOT / "deploy" / "compose" / "flags.yaml"]


def doc(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "key": "k",
        "route": {"path_prefix": "/k"},
        "stable": {"name": "v1", "upstream": "http://a"},
        "canary": {"name": "v2", "upstream": "http://b"},
        "schedule": {"steps": [{"weight": 0.1, "hold": "1m"}, {"weight": 1.0, "hold": "1m"}]},
    }
    return {**base, **fields}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_flag_files_still_validate_after_every_flag_is_promoted(path: Path) -> None:
    raw = load_yaml(path.read_text())
    assert isinstance(raw, dict)
    flags = raw["flags"]
    assert any(f.get("canary") for f in flags)
    promoted = {"flags": [promoted_document(f) for f in flags]}
    flag_set = parse_flag_set(promoted)
    for before, after in zip(flags, flag_set.flags, strict=True):
        if before.get("canary"):
            assert after.stable.name == before["canary"]["name"] and after.canary is None


def test_rules_naming_the_canary_by_role_or_name_now_say_stable() -> None:
    rules = [
        {"if": {"header": "x", "equals": "1"}, "then": "canary"},
        {"if": {"header": "y", "equals": "1"}, "then": "v2"},
        {"if": {"header": "z", "equals": "1"}, "then": "stable"},
    ]
    original = doc(rules=rules)
    kept = copy.deepcopy(original)
    promoted = promoted_document(original)
    assert original == kept  # the input is not touched
    assert [r["then"] for r in promoted["rules"]] == ["stable", "stable", "stable"]
    assert promoted["stable"] == original["canary"] and "canary" not in promoted
    assert promoted["schedule"] == original["schedule"]
    parse_flag(promoted)


def test_a_rule_naming_the_retired_stable_makes_the_promotion_invalid() -> None:
    promoted = promoted_document(doc(rules=[{"if": {"unit_in": ["a"]}, "then": "v1"}]))
    with pytest.raises(Exception, match="unknown variant 'v1'"):
        parse_flag(promoted)


def test_without_a_canary_nothing_changes() -> None:
    original = doc()
    del original["canary"]
    assert promoted_document(original) == original


SCHEDULE_EDIT = {"steps": [{"weight": 0.2, "hold": "1m"}, {"weight": 1.0, "hold": "1m"}]}
NEW_CANARY = {"name": "v2", "upstream": "http://elsewhere"}
RENAMED = {"name": "v3", "upstream": "http://b"}


@pytest.mark.parametrize(
    ("edit", "phase", "expected"),
    [
        ({"salt": "s"}, Phase.RUNNING, KEEPS),
        ({"salt": "s"}, Phase.ROLLED_BACK, STAYS_ROLLED_BACK),
        ({"schedule": SCHEDULE_EDIT}, Phase.RUNNING, STARTS),
        ({"schedule": SCHEDULE_EDIT}, Phase.PAUSED, STARTS),
        ({"schedule": SCHEDULE_EDIT}, Phase.ROLLED_BACK, STAYS_ROLLED_BACK),
        ({"schedule": SCHEDULE_EDIT}, Phase.PROMOTED, KEEPS),
        ({"canary": NEW_CANARY}, Phase.ROLLED_BACK, STARTS),
        ({"canary": RENAMED}, Phase.ROLLED_BACK, STARTS),
        ({"canary": NEW_CANARY}, Phase.RUNNING, STARTS),
        ({"canary": None}, Phase.RUNNING, KEEPS),
    ],
)
def test_consequence_of_an_edit(edit: dict[str, Any], phase: Phase, expected: str) -> None:
    before, after = parse_flag(doc()), parse_flag(doc(**edit))
    assert consequence(before, after, phase) == expected
    # the controller decides by the same rule
    starts = needs_new_rollout(plan_of(before), plan_of(after), phase)
    assert starts == (expected == STARTS)


def test_a_new_flag_or_a_canary_added_starts_a_rollout() -> None:
    without = doc()
    del without["canary"]
    assert consequence(None, parse_flag(doc()), None) == STARTS
    assert consequence(parse_flag(without), parse_flag(doc()), Phase.PROMOTED) == STARTS
