"""deploy/prometheus/rules.yml: valid for promtool, its unit tests pass, and every rule reads
only what the gateway exports or another rule records."""

from __future__ import annotations

import re

import yaml
from promql import (
    REPO,
    RULE_TESTS,
    RULES,
    exported_metrics,
    metrics_in,
    promtool,
    recorded_metrics,
    rule_groups,
)

# The SRE section lives in docs/readme/sre.md until it is merged into README.md.
README_PARTS = (REPO / "README.md", REPO / "docs" / "readme" / "sre.md")


def alerts() -> list[dict[str, object]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "--lint=all", "--lint-fatal", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool unit tests under deploy/prometheus/tests/"
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_read_only_exported_or_recorded_metrics() -> None:
    known = exported_metrics() | recorded_metrics()
    for group in rule_groups():
        for rule in group["rules"]:
            unknown = metrics_in(rule["expr"]) - known
            name = rule.get("record") or rule.get("alert")
            assert not unknown, f"{group['name']}/{name} reads unknown metrics {unknown}"


def test_recording_rules_follow_the_naming_convention() -> None:
    # level:metric:operations, with the levels the dashboard aggregates by
    for name in recorded_metrics():
        level, metric, _ = name.split(":")
        assert level in {"flag", "flag_variant", "flag_shadow"}, name
        assert metric.startswith("gateway_"), name


def test_burn_rate_alerts_use_the_workbook_windows() -> None:
    by_name = {a["alert"]: str(a["expr"]) for a in alerts()}
    for slo in ("Availability", "Latency"):
        fast, slow = by_name[f"Gateway{slo}BudgetBurnFast"], by_name[f"Gateway{slo}BudgetBurnSlow"]
        assert re.findall(r"burn_rate(\w+) > ([\d.]+)", fast) == [("5m", "14.4"), ("1h", "14.4")]
        assert re.findall(r"burn_rate(\w+) > ([\d.]+)", slow) == [("30m", "6"), ("6h", "6")]


def test_rollback_alert_fires_without_delay() -> None:
    (rollback,) = [a for a in alerts() if a["alert"] == "GatewayCanaryRolledBack"]
    assert rollback.get("for", "0m") == "0m"


def test_every_alert_is_unit_tested_firing() -> None:
    fired: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    assert {a["alert"] for a in alerts()} - fired == set()


def test_unit_tests_order_every_rule_group() -> None:
    # promtool evaluates groups in random order unless told; an unlisted group breaks that
    names = [g["name"] for g in rule_groups()]
    for path in RULE_TESTS:
        assert yaml.safe_load(path.read_text())["group_eval_order"] == names, path.name


def test_every_alert_has_a_runbook() -> None:
    runbooks = "\n".join(p.read_text() for p in README_PARTS if p.exists())
    for alert in alerts():
        name = str(alert["alert"])
        annotations = alert["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["runbook"] == f"README.md#{name.lower()}", name
        assert re.search(rf"^#+ {name}$", runbooks, re.MULTILINE), f"no runbook for {name}"
        assert {"severity"} <= set(alert["labels"]), name  # type: ignore[arg-type]
