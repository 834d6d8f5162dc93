"""The offline CLI: `gateway flags validate FILE` and `gateway assign KEY --flags FILE`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mmh3
import pytest
import yaml
from conftest import free_port
from typer.testing import CliRunner

import gateway.cli.offline  # noqa: F401 - registers the commands on `app`
from gateway.cli import app

runner = CliRunner()

FLAGS = {
    "flags": [
        {
            "key": "sentiment",
            "route": {"path_prefix": "/v1/sentiment"},
            "unit": {"from": "header", "name": "X-User-Id"},
            "stable": {"name": "v1", "upstream": "http://127.0.0.1:9001"},
            "canary": {"name": "v2", "upstream": "http://127.0.0.1:9002"},
            "variants": [{"name": "v3", "upstream": "http://127.0.0.1:9003", "weight": 0.2}],
            "schedule": {"kind": "step", "steps": [{"weight": 0.25, "hold": "5m"}]},
            "rules": [{"if": {"unit_in": ["tester"]}, "then": "canary"}],
        },
        {
            "key": "ranker",
            "route": {"path_prefix": "/v1/rank"},
            "salt": "rank-2024",
            "stable": {"name": "r1", "upstream": "http://127.0.0.1:9011"},
            "canary": {"name": "r2", "upstream": "http://127.0.0.1:9012"},
            "schedule": {"kind": "exponential", "p0": 0.1, "rate": "0.5/h"},
        },
    ]
}
UNITS = [f"user-{i}" for i in range(300)]


def write(tmp_path: Path, doc: Any, name: str = "flags.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")
    return path


Arms = list[tuple[str, float]]


def expected(
    salt: str, unit: str, weight: float, arms: Arms, stable: str, canary: str
) -> dict[str, Any]:
    """DESIGN 3 written out independently of gateway.core.assignment."""
    b = mmh3.hash(f"{salt}:{unit}", seed=0, signed=False) % 10000
    if b < round(weight * 10000):
        return {"unit": unit, "variant": canary, "bucket": b, "reason": "canary"}
    vb = mmh3.hash(f"{salt}:{unit}", seed=86028157, signed=False) % 10000
    cumulative = 0.0
    for name, share in arms:
        cumulative += share
        if vb < round(cumulative * 10000):
            return {"unit": unit, "variant": name, "bucket": b, "reason": "variant"}
    return {"unit": unit, "variant": stable, "bucket": b, "reason": "stable"}


def lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines()]


# --- flags validate ---------------------------------------------------------------------------


def test_validate_ok(tmp_path: Path) -> None:
    result = runner.invoke(app, ["flags", "validate", str(write(tmp_path, FLAGS))])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "ok: 2 flags (sentiment, ranker)"


def test_validate_reads_json(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(FLAGS), "flags.json")
    result = runner.invoke(app, ["flags", "validate", str(path)])
    assert result.exit_code == 0, result.output


def test_validate_prints_every_error(tmp_path: Path) -> None:
    bad = json.loads(json.dumps(FLAGS))
    bad["flags"][0]["canary"]["upstream"] = "ftp://nowhere"
    bad["flags"][0]["surprise"] = 1
    bad["flags"][1]["guard"] = {"e0": 0.2, "e1": 0.1}
    result = runner.invoke(app, ["flags", "validate", str(write(tmp_path, bad))])
    assert result.exit_code == 1
    assert result.stdout == ""
    errors = result.stderr.splitlines()
    assert len(errors) >= 3, errors
    assert all(": " in line for line in errors)
    paths = [line.split(": ", 1)[0] for line in errors]
    assert "flags[0].canary.upstream" in paths
    assert "flags[0].surprise" in paths
    assert any(p.startswith("flags[1].guard") for p in paths)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), ("flags: [unclosed\n", "not valid YAML or JSON: line")],
)
def test_validate_unreadable_or_unparsable(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "flags.yaml" if content is None else write(tmp_path, content)
    result = runner.invoke(app, ["flags", "validate", str(path)])
    assert result.exit_code == 1
    assert message in result.stderr


# --- assign -----------------------------------------------------------------------------------


def test_assign_equals_the_formula(tmp_path: Path) -> None:
    path = write(tmp_path, FLAGS)
    units_file = tmp_path / "units.txt"
    units_file.write_text("\n".join(UNITS) + "\n\n", encoding="utf-8")
    args = ["--flags", str(path), "--units-file", str(units_file), "--weight", "0.3"]
    result = runner.invoke(app, ["assign", "sentiment", *args])
    assert result.exit_code == 0, result.output
    got = lines(result.stdout)
    assert got == [expected("sentiment", u, 0.3, [("v3", 0.2)], "v1", "v2") for u in UNITS]
    assert {g["reason"] for g in got} == {"canary", "variant", "stable"}


def test_assign_defaults_to_the_schedules_first_weight(tmp_path: Path) -> None:
    path = str(write(tmp_path, FLAGS))
    args = [arg for u in UNITS for arg in ("--unit", u)]
    steps = runner.invoke(app, ["assign", "sentiment", "--flags", path, *args])
    assert lines(steps.stdout) == [
        expected("sentiment", u, 0.25, [("v3", 0.2)], "v1", "v2") for u in UNITS
    ]
    exponential = runner.invoke(app, ["assign", "ranker", "--flags", path, *args])
    assert lines(exponential.stdout) == [
        expected("rank-2024", u, 0.1, [], "r1", "r2") for u in UNITS
    ]


def test_assign_positional_unit_and_rules(tmp_path: Path) -> None:
    path = str(write(tmp_path, FLAGS))
    result = runner.invoke(app, ["assign", "sentiment", "tester", "--flags", path, "--weight", "0"])
    assert result.exit_code == 0, result.output
    bucket = mmh3.hash("sentiment:tester", seed=0, signed=False) % 10000
    assert lines(result.stdout) == [
        {"unit": "tester", "variant": "v2", "bucket": bucket, "reason": "rule"}
    ]


def test_assign_without_flags_asks_a_gateway_and_says_how_when_none_answers() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["assign", "sentiment", "alice", "--admin-url", nowhere])
    assert result.exit_code == 3  # unreachable (documented exit code)
    assert "--admin-url" in result.output
    assert "--flags" in result.output


def test_assign_errors(tmp_path: Path) -> None:
    path = str(write(tmp_path, FLAGS))
    unknown = runner.invoke(app, ["assign", "nope", "--flags", path, "--unit", "a"])
    assert unknown.exit_code == 1
    assert "no flag 'nope'" in unknown.stderr
    no_units = runner.invoke(app, ["assign", "sentiment", "--flags", path])
    assert no_units.exit_code == 2
    too_heavy = runner.invoke(app, ["assign", "sentiment", "a", "--flags", path, "--weight", "2"])
    assert too_heavy.exit_code == 2
