"""deploy/k8s: the manifests agree with each other, with the image and with the gateway's
settings. (Their schemas are checked by kubernetes-validate in `make lint`.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from promql import DEPLOY, REPO

from gateway.core.flags import parse_flag_set
from gateway.settings import Settings, load_settings, parse_tokens

K8S = DEPLOY / "k8s"


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one resource of that kind under deploy/k8s (monitoring/ included)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']} resources"
            found[doc["kind"]] = doc
    return found


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = manifests()["Deployment"]["spec"]["template"]
    return spec


def container() -> dict[str, Any]:
    (only,) = pod()["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def settings(tmp_path: Path) -> Settings:
    path = tmp_path / "gateway.yaml"
    path.write_text(manifests()["ConfigMap"]["data"]["gateway.yaml"])
    return load_settings(path, env={})


def port_named(name: str) -> int:
    (port,) = [p["containerPort"] for p in container()["ports"] if p["name"] == name]
    return int(port)


def test_three_replicas_on_a_shared_store(tmp_path: Path) -> None:
    assert manifests()["Deployment"]["spec"]["replicas"] == 3
    assert settings(tmp_path).store.kind == "redis"  # the memory store lives in one process


def test_ports_match_the_settings(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert port_named("http") == s.listen.port == 8080
    assert port_named("admin") == s.admin.port == 9090
    assert s.listen.host == s.admin.host == "0.0.0.0"


def test_probes_use_the_admin_port() -> None:
    c = container()
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["startupProbe"]["httpGet"]["port"] == "admin"


def test_runs_as_the_image_s_non_root_user_on_a_read_only_root() -> None:
    uid = re.search(r"^USER (\d+):(\d+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert uid, "the Dockerfile's USER must be numeric"
    security = pod()["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid[1]), int(uid[2]))
    c = container()["securityContext"]
    assert c["readOnlyRootFilesystem"] is True and c["allowPrivilegeEscalation"] is False
    assert c["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod()["spec"]["volumes"]}
    tmp = [m for m in container()["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]]


def test_resources_are_requested_and_limited() -> None:
    resources = container()["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


def test_config_map_carries_settings_and_flags_where_the_command_reads_them(
    tmp_path: Path,
) -> None:
    args = container()["args"]
    assert args == ["gateway", "serve", "--config", "/etc/gateway/gateway.yaml"]
    (mount,) = [m for m in container()["volumeMounts"] if m["name"] == "config"]
    volumes = {v["name"]: v for v in pod()["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == manifests()["ConfigMap"]["metadata"]["name"]
    data = manifests()["ConfigMap"]["data"]
    assert f"{mount['mountPath']}/gateway.yaml" == args[-1]
    assert settings(tmp_path).store.flags_file == f"{mount['mountPath']}/flags.yaml"
    assert parse_flag_set(yaml.safe_load(data["flags.yaml"])).flags


def test_admin_tokens_come_from_the_secret() -> None:
    (env,) = [e for e in container()["env"] if e["name"] == "GATEWAY_ADMIN_TOKENS"]
    ref = env["valueFrom"]["secretKeyRef"]
    secret = manifests()["Secret"]
    assert ref["name"] == secret["metadata"]["name"]
    tokens = parse_tokens(secret["stringData"][ref["key"]])
    assert {t.role for t in tokens} == {"operator", "viewer"}
    assert all("REPLACE" in t.secret for t in tokens), "only placeholders in the repo"


def test_service_and_scraping_reach_the_named_ports() -> None:
    labels = pod()["metadata"]["labels"]
    service = manifests()["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["ports"]} == {
        ("http", 8080, "http"),
        ("admin", 9090, "admin"),
    }
    annotations = pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port_named("admin")
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = manifests()["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["admin"]


def test_autoscaler_and_disruption_budget_cover_the_deployment() -> None:
    deployment = manifests()["Deployment"]
    hpa = manifests()["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= deployment["spec"]["replicas"]
    pdb = manifests()["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod()["metadata"]["labels"].items()


def test_kustomization_lists_every_core_manifest() -> None:
    listed = set(manifests()["Kustomization"]["resources"])
    core = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == core  # the ServiceMonitor needs the Prometheus Operator: opt in


def test_admin_port_is_kept_in_the_cluster() -> None:
    policy = manifests()["NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod()["metadata"]["labels"].items()
    assert spec["policyTypes"] == ["Ingress"]
    by_port = {p["port"]: rule for rule in spec["ingress"] for p in rule["ports"]}
    assert set(by_port) == {"http", "admin"}
    assert {"http", "admin"} == {p["name"] for p in container()["ports"]}
    assert "from" not in by_port["http"]  # the data plane: whoever reaches the Service
    # the admin port: pods of this cluster only (a namespace selector, never an ipBlock)
    assert by_port["admin"]["from"] == [{"namespaceSelector": {}}]


def test_prometheus_rule_is_generated_from_rules_yml() -> None:
    """The committed PrometheusRule is what the generator makes of rules.yml today, so a rule
    added to rules.yml without regenerating fails here."""
    import runpy

    generator = runpy.run_path(str(DEPLOY / "gen_prometheusrule.py"))
    rules = (DEPLOY / "prometheus" / "rules.yml").read_text()
    committed = (K8S / "monitoring" / "prometheusrule.yaml").read_text()
    assert committed == generator["render"](rules), "run python deploy/gen_prometheusrule.py"
    resource = manifests()["PrometheusRule"]
    assert resource["spec"]["groups"] == yaml.safe_load(rules)["groups"]
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
