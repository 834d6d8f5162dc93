"""deploy/grafana/gateway.json: valid dashboard JSON whose every query parses (promtool) and
reads only metrics the gateway exports or the recording rules define."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from promql import (
    DEPLOY,
    dashboard,
    dashboard_queries,
    exported_metrics,
    fill_variables,
    metrics_in,
    promtool,
    recorded_metrics,
    rule_groups,
    walk,
)

GLOBAL_METRICS = {  # no flag label
    "gateway_flag_store_up",
    "gateway_flag_store_sync_age_seconds",
    "gateway_flag_store_restores_total",
    "gateway_build_info",
    "gateway_fast_path",
    "gateway_connections_refused_total",
}
PANEL_TYPES = {"row", "timeseries", "stat", "state-timeline"}


def panels() -> list[dict[str, object]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_every_query_parses(tmp_path: Path) -> None:
    queries = dashboard_queries()
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": fill_variables(expr)}
        for i, (_, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    listing = "\n".join(f"{i}: {where}: {expr}" for i, (where, expr) in enumerate(queries))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nqueries:\n{listing}"
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_queries_read_only_exported_or_recorded_metrics() -> None:
    known = exported_metrics() | recorded_metrics()
    for where, expr in dashboard_queries():
        names = metrics_in(fill_variables(expr))
        assert names, f"{where} reads no metric: {expr}"
        assert names <= known, f"{where} reads unknown metrics {names - known}"


def test_per_flag_queries_follow_the_flag_variable() -> None:
    for where, expr in dashboard_queries():
        if where.startswith("variable") or metrics_in(fill_variables(expr)) <= GLOBAL_METRICS:
            continue
        assert 'flag=~"$flag"' in expr, f"{where} ignores the flag variable: {expr}"


def test_every_exported_metric_is_on_the_dashboard() -> None:
    # directly, or through the recording rules a panel reads
    reads: dict[str, set[str]] = {}
    for rule in (r for g in rule_groups() for r in g["rules"] if "record" in r):
        reads.setdefault(rule["record"], set()).update(metrics_in(rule["expr"]))
    shown: set[str] = set()
    todo = set().union(*(metrics_in(fill_variables(e)) for _, e in dashboard_queries()))
    while todo:
        name = todo.pop()
        shown.add(name)
        todo |= reads.get(name, set()) - shown
    # the histogram's _sum is the one series no panel needs
    missing = exported_metrics() - shown - {"gateway_request_duration_seconds_sum"}
    assert not missing, f"metrics no panel shows: {missing}"


def test_dashboard_is_grafana_json() -> None:
    doc = dashboard()
    assert doc["uid"] and doc["title"]
    assert isinstance(doc["schemaVersion"], int) and doc["schemaVersion"] >= 36
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    flag = variables["flag"]
    assert flag["type"] == "query" and flag["multi"] and flag["includeAll"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in doc["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        pos = panel["gridPos"]
        assert set(pos) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in pos.values())
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_panel_uses_the_datasource_variable() -> None:
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert isinstance(targets, list) and targets, panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["datasource"] == panel["datasource"], panel["title"]
    uids = {str(d["uid"]) for d in walk(dashboard()) if isinstance(d.get("uid"), str)}
    assert uids <= {"canary-gateway", "${datasource}", "-- Grafana --"}, uids


def test_the_issue_s_panels_are_there() -> None:
    titles = {str(p["title"]) for p in panels()}
    for wanted in (
        "Requests by variant",
        "5xx ratio by variant",
        "Latency by variant",
        "Canary weight",
        "Guard log-likelihood ratio",
        "Paired t statistic",
        "p-value (fixed n)",
        "Always-valid p-value",
        "Mean difference, 95 % CI (fixed n)",
        "Mean difference, 95 % confidence sequence",
        "Verdict",
        "Unmeasured pairs",
        "Flag store up by replica",
        "Sync age by replica",
        "Availability burn rate",
        "Latency burn rate",
        "Error budget left (30d)",
    ):
        assert wanted in titles
    guard = next(p for p in panels() if p["title"] == "Guard log-likelihood ratio")
    exprs = " ".join(t["expr"] for t in guard["targets"])  # type: ignore[attr-defined]
    assert 'bound="A"' in exprs and 'bound="B"' in exprs
    names = [a["name"] for a in dashboard()["annotations"]["list"]]
    assert "Rollbacks" in names


def test_shadow_panels_need_no_decoding_of_the_stat_label() -> None:
    # Each shadow panel shows what its title says: every query of gateway_shadow_ttest picks
    # one stat, keeps the metric apart, and names its series without the stat label.
    wanted = {
        "p-value (fixed n)": {"p"},
        "Always-valid p-value": {"p_always_valid"},
        "Mean difference, 95 % CI (fixed n)": {"mean_diff", "ci95_low", "ci95_high"},
        "Mean difference, 95 % confidence sequence": {"mean_diff", "cs95_low", "cs95_high"},
        "Paired t statistic": {"t"},
        "Pairs": {"n"},
    }
    by_title = {str(p["title"]): p for p in panels()}
    for title, stats in wanted.items():
        targets = by_title[title]["targets"]
        shown = set()
        for target in targets:  # type: ignore[attr-defined]
            expr, legend = target["expr"], target["legendFormat"]
            assert "gateway_shadow_ttest" in expr and "by (flag, shadow, metric)" in expr, title
            (stat,) = re.findall(r'stat="([a-z0-9_]+)"', expr)
            shown.add(stat)
            assert "{{metric}}" in legend and "{{stat}}" not in legend, title
        assert shown == stats, title
    verdict = by_title["Verdict"]["targets"][0]["expr"]  # type: ignore[index]
    assert "gateway_shadow_verdict" in verdict and "by (flag, shadow, metric)" in verdict


def test_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://")
    providers = yaml.safe_load((provisioning / "dashboards" / "gateway.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
