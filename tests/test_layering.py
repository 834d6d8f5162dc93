"""The admin wing depends on the gateway through admin.ports, never on gateway.app (STYLE.md:
imports point one way, `admin` <- `app`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ADMIN = Path(__file__).resolve().parent.parent / "gateway" / "admin"
MODULES = sorted(f"gateway.admin.{p.stem}" for p in ADMIN.glob("*.py") if p.stem != "__init__")


def _imported(path: Path) -> set[str]:
    """Every module `path` imports anywhere: top level, in functions, under TYPE_CHECKING."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_admin_modules_are_found() -> None:
    assert {"gateway.admin.api", "gateway.admin.health", "gateway.admin.rollout_api"} <= set(
        MODULES
    )


@pytest.mark.parametrize("path", sorted(ADMIN.glob("*.py")), ids=lambda p: p.name)
def test_no_admin_module_imports_the_app(path: Path) -> None:
    wrong = {n for n in _imported(path) if n == "gateway.app" or n.startswith("gateway.app.")}
    assert not wrong, f"{path.name} imports {sorted(wrong)}: take an admin.ports Protocol instead"


@pytest.mark.parametrize("module", MODULES)
def test_each_admin_module_imports_alone_without_the_app(module: str) -> None:
    """A fresh interpreter imports the module first, before anything has imported the app."""
    probe = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        "sys.exit(3 if 'gateway.app' in sys.modules else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr or f"importing {module} imported gateway.app"
