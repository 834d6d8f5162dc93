#!/usr/bin/env python3
"""Write deploy/k8s/monitoring/prometheusrule.yaml from deploy/prometheus/rules.yml.

rules.yml is the one source of the alert and recording rules (promtool checks and unit-tests
it); the Prometheus Operator wants the same groups wrapped in a PrometheusRule. Run this after
changing rules.yml; `--check` exits 1 when the committed file is out of date (the tests run it).

    python deploy/gen_prometheusrule.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
RULES = DEPLOY / "prometheus" / "rules.yml"
TARGET = DEPLOY / "k8s" / "monitoring" / "prometheusrule.yaml"
HEADER = """\
# Generated from deploy/prometheus/rules.yml by deploy/gen_prometheusrule.py: do not edit.
# For the Prometheus Operator (CRD monitoring.coreos.com/v1), next to servicemonitor.yaml.
# Label it as your Prometheus' ruleSelector expects (often `release: <name>`).
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as `|` blocks, as they are written in rules.yml."""


def _text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _text)


def render(rules_text: str) -> str:
    groups: list[Any] = yaml.safe_load(rules_text)["groups"]
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "canary-gateway",
            "labels": {
                "app.kubernetes.io/name": "canary-gateway",
                "app.kubernetes.io/component": "gateway",
            },
        },
        "spec": {"groups": groups},
    }
    body = yaml.dump(resource, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


def main(argv: list[str]) -> int:
    fresh = render(RULES.read_text(encoding="utf-8"))
    if "--check" in argv:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != fresh:
            print(f"{TARGET}: out of date; run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
