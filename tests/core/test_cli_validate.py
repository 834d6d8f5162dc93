"""`gateway flags validate` on hostile and sloppy files: every problem listed, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import GATEWAY_BIN
from test_documents import LAUGHS
from typer.testing import CliRunner

import gateway.cli.offline  # noqa: F401 - registers the commands on `app`
from gateway.cli import app

runner = CliRunner()
FLAG = """flags:
  - key: k
    route: {path_prefix: /k}
    stable: {name: v1, upstream: http://a}
    canary: {name: v2, upstream: http://b}
"""

CASES = {
    "billion laughs": (LAUGHS, "more than 100000 values"),
    "deep sequence": ("flags: " + "[" * 50_000 + "]" * 50_000, "nested more than"),
    "deep mapping": ("flags: " + "{a: " * 3000 + "1" + "}" * 3000, "nested more than"),
    "duplicate key": (FLAG + "    key: k2\n", "flags[0].key: duplicate key 'key'"),
    "exponent without a dot": (
        FLAG + "    guard: {e1: 1e-2}\n",
        "flags[0].guard.e1: must be a number, got the string '1e-2' (YAML reads 1e-2 without "
        "a dot as a string): write 0.01",
    ),
    "yes is not true": (FLAG + "    advance_requires_evidence: yes\n", "true or false"),
    "dot segment": (FLAG.replace("/k}", "/k/../admin}"), "flags[0].route.path_prefix"),
    "overflowing hold": (
        FLAG + "    schedule: {steps: [{weight: 0.5, hold: 999999999999999999d}]}\n",
        "flags[0].schedule.steps[0].hold: must be at most 365d",
    ),
}


@pytest.mark.parametrize(("text", "words"), CASES.values(), ids=list(CASES))
def test_validate_lists_the_problem_and_exits_1(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "flags.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["flags", "validate", str(path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert words in result.output
    assert "Traceback" not in result.output


def test_the_installed_command_prints_no_traceback_on_billion_laughs(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    done = subprocess.run(
        [str(GATEWAY_BIN), "flags", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip() == "$: more than 100000 values once aliases are expanded: refused"
