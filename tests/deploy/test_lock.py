"""The lock file and pyproject's bounds agree: every dependency is bounded on both sides, and
the version the lock pins (the one the suite runs on) lies within those bounds."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [
    Requirement(line)
    for line in [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["dev"]]
]


def _locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            pins[_canonical(match[1])] = Version(match[2])
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("requirement", REQUIREMENTS, ids=str)
def test_bounded_above_and_below(requirement: Requirement) -> None:
    operators = {spec.operator for spec in requirement.specifier}
    assert operators & {">=", ">", "=="}, f"{requirement}: no lower bound"
    assert operators & {"<", "<=", "==", "~="}, f"{requirement}: no upper bound"


@pytest.mark.parametrize("requirement", REQUIREMENTS, ids=str)
def test_lock_pins_a_version_within_the_bounds(requirement: Requirement) -> None:
    locked = _locked().get(_canonical(requirement.name))
    assert locked is not None, f"{requirement.name} is not in requirements.lock: run `make lock`"
    assert requirement.specifier.contains(locked, prereleases=True), (
        f"requirements.lock pins {requirement.name}=={locked}, outside {requirement.specifier}:"
        " run `make lock`"
    )
