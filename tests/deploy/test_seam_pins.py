"""The direct client's version check and pyproject.toml name the same aiohttp releases: the
seam loads the direct client on exactly the releases the pins allow (and the lock tests)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from gateway.dataplane.upstream.choice import TESTED_AIOHTTP

REPO = Path(__file__).resolve().parents[2]


def test_the_tested_aiohttp_range_is_pyprojects() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (aiohttp,) = [r for r in map(Requirement, project["dependencies"]) if r.name == "aiohttp"]
    low, high = (".".join(map(str, bound)) for bound in TESTED_AIOHTTP)
    assert aiohttp.specifier == SpecifierSet(f">={low},<{high}"), aiohttp
