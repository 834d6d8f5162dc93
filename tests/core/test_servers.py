"""The seam between the data plane and its HTTP server (gateway/dataplane/servers.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from gateway.dataplane.servers import (
    FAST_MODULE,
    STOCK_NOT_KEPT,
    UVICORN_TESTED,
    in_range,
    installed_version,
    resolve,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_tested_uvicorn_range_is_pyprojects_bound() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("uvicorn"))
    floor = re.search(r">=(\d+)\.(\d+)", spec)
    ceiling = re.search(r"<(\d+)\.(\d+)", spec)
    assert floor and ceiling, spec
    bounds = ((int(floor[1]), int(floor[2])), (int(ceiling[1]), int(ceiling[2])))
    assert bounds == UVICORN_TESTED


def test_fast_is_served_on_the_installed_uvicorn() -> None:
    found = installed_version("uvicorn")
    assert found is not None and in_range(found, UVICORN_TESTED)
    adapter, why = resolve("fast")
    assert (adapter.name, why) == ("fast", None)


@pytest.mark.parametrize("found", ["0.55.0", "0.55.7rc1"])
def test_fast_is_imported_on_any_release_of_the_tested_minor(found: str) -> None:
    imported: list[str] = []

    def load(name: str) -> ModuleType:
        imported.append(name)
        return ModuleType(name)

    adapter, why = resolve("fast", version_of=lambda _: found, load=load)
    assert (adapter.name, why, imported) == ("fast", None, [FAST_MODULE])


@pytest.mark.parametrize("found", ["0.54.9", "0.56.0", "1.0.0", "garbage"])
def test_fast_falls_back_to_stock_outside_the_tested_range(found: str) -> None:
    imported: list[str] = []

    def load(name: str) -> ModuleType:
        imported.append(name)
        return ModuleType(name)

    adapter, why = resolve("fast", version_of=lambda _: found, load=load)
    assert adapter.name == "stock"
    assert why is not None and found in why
    assert imported == []  # the fast protocol is never imported there


def test_fast_falls_back_to_stock_when_its_import_fails() -> None:
    def load(name: str) -> ModuleType:
        raise ImportError("cannot import name 'HttpToolsProtocol'")

    adapter, why = resolve("fast", load=load)
    assert adapter.name == "stock"
    assert why is not None and "HttpToolsProtocol" in why
    assert adapter.not_kept == STOCK_NOT_KEPT and len(STOCK_NOT_KEPT) >= 4


def test_the_fallback_is_one_warning_line_naming_what_stock_does_not_keep() -> None:
    """In a fresh interpreter that sees uvicorn 0.56: one warning, whatever asks for it."""
    code = (
        "import logging, importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda d: '0.56.0' if d == 'uvicorn' else real(d)\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from gateway.build import server_choice\n"
        "from gateway.settings import Settings\n"
        "import sys\n"
        "print(server_choice(Settings()), server_choice(Settings()))\n"
        f"print({FAST_MODULE!r} in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["stock", "stock", "False"], done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, done.stderr
    assert "uvicorn 0.56.0 is outside the tested >=0.55,<0.56" in warnings[0]
    assert "limits.head_timeout_s" in warnings[0] and "trailer" in warnings[0]


def test_stock_never_imports_the_fast_protocol() -> None:
    code = (
        "import sys\n"
        "from gateway.app import create_app\n"
        "from gateway.dataplane.server import serve_gateway\n"
        "from gateway.dataplane.servers import choose\n"
        "from gateway.settings import Settings\n"
        "create_app(Settings.model_validate({'server': {'http': 'stock'}}))\n"
        "choose('stock')\n"
        f"prefixes = ({FAST_MODULE!r}, 'uvicorn.protocols')\n"
        "print(sorted(m for m in sys.modules if m.startswith(prefixes)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_nothing_outside_the_fast_package_imports_uvicorns_internals() -> None:
    pattern = re.compile(
        r"^\s*(from|import)\s+uvicorn\.(protocols|lifespan|loops|middleware)|"
        r"^\s*from\s+uvicorn[\w.]*\s+import\s+.*\b_\w+",
        re.M,
    )
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "gateway").rglob("*.py")
        if "fast" not in path.relative_to(ROOT / "gateway").parts
        and pattern.search(path.read_text())
    ]
    assert offenders == []
