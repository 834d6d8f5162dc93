"""What the deploy/ tests share: promtool, the metric names the gateway exports, the metric
names a PromQL expression reads, and the dashboard's queries.

The gateway's names come from a live `Metrics` on a fresh registry (not from a list kept by
hand): a counter `gateway_x` is scraped as `gateway_x_total`, a histogram as `_bucket`, `_sum`
and `_count`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "gateway.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# Grafana's variables, as the offline checks fill them in.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${flag}": ".*",
    "$flag": ".*",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool; a missing promtool fails the test with what to install (never a skip)."""
    if not Path(PROMTOOL).exists():
        pytest.fail(
            "promtool not found: install Prometheus (Debian: apt-get install prometheus, which "
            "ships /usr/bin/promtool) to check the alerting rules and the dashboard's queries",
            pytrace=False,
        )
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def exported_metrics() -> set[str]:
    """Every series name the gateway's /metrics can carry."""
    registry = CollectorRegistry()
    Metrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def recorded_metrics() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w:.])[A-Za-z_:][A-Za-z0-9_:]*(?![\w:]|\s*\()")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}


def metrics_in(expr: str) -> set[str]:
    """The metric names `expr` selects (not functions, labels, keywords or durations)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _NAME.findall(text) if name.lower() not in _KEYWORDS}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries(doc: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and query variable."""
    doc = dashboard() if doc is None else doc
    found: list[tuple[str, str]] = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for annotation in doc["annotations"]["list"]:
        if "expr" in annotation:
            found.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            found.append((f"variable ${variable['name']}", label_values_selector(text)))
    return found


def label_values_selector(query: str) -> str:
    """`label_values(metric{...}, label)` as the PromQL selector Grafana asks about."""
    match = re.fullmatch(r"\s*label_values\((.+),\s*\w+\s*\)\s*", query)
    assert match, f"unexpected variable query {query!r}"
    return match.group(1)


def fill_variables(expr: str, values: dict[str, str] | None = None) -> str:
    for name, value in {**GRAFANA_VARIABLES, **(values or {})}.items():
        expr = expr.replace(name, value)
    return expr


def walk(node: object) -> Iterator[dict[str, Any]]:
    """Every mapping in a JSON document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)
