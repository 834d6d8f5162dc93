"""deploy/compose.yaml, checked without Docker: services, ports, mounts, healthchecks, the
settings and flags it mounts, and the Prometheus configuration it runs."""

from __future__ import annotations

import re
import shlex
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from promql import DEPLOY, REPO, RULES, promtool

from gateway.core.flags import parse_flag_set
from gateway.settings import load_settings

COMPOSE = DEPLOY / "compose.yaml"
GATEWAYS = ("gateway-1", "gateway-2")
MODELS = {"model-v1": "v1", "model-v2": "v2", "model-v3": "v3"}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> repo path of every bind mount (named volumes left out)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            found[target] = (COMPOSE.parent / source).resolve()
    return found


def gateway_settings(name: str) -> Any:
    service = services()[name]
    config = option(service["command"], "--config")
    return load_settings(mounts(service)[config], env=service["environment"])


def healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    command = " ".join(test[1:]) if test[0] == "CMD" else test[1]
    match = re.search(r"http://[^\s'\"]+", command)
    assert match, f"no URL in healthcheck {test}"
    return match.group(0)


def test_the_stack_has_the_issue_s_services() -> None:
    names = set(services())
    assert {"redis", "prometheus", "grafana", *GATEWAYS, *MODELS} <= names


def test_every_dependency_is_a_service() -> None:
    names = set(services())
    for name, service in services().items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on with conditions, please"
        assert set(depends) <= names - {name}, f"{name} depends on {set(depends) - names}"
        for dependency, condition in depends.items():
            assert condition["condition"] in ("service_started", "service_healthy")
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services()[dependency], f"{name} waits on {dependency}"


def test_published_ports_do_not_clash_and_stay_on_loopback() -> None:
    published = []
    for name, service in services().items():
        for port in service.get("ports", []):
            host_ip, host_port, _ = port.split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published.append(int(host_port))
    clashes = [p for p, n in Counter(published).items() if n > 1]
    assert not clashes, f"host ports published twice: {clashes}"


def test_gateway_ports_are_the_ones_its_settings_listen_on() -> None:
    for name in GATEWAYS:
        settings = gateway_settings(name)
        container_ports = {int(p.split(":")[2]) for p in services()[name]["ports"]}
        assert container_ports == {settings.listen.port, settings.admin.port}
        assert settings.listen.host == settings.admin.host == "0.0.0.0"


def test_every_mounted_file_exists_in_the_repo() -> None:
    declared = set(compose().get("volumes", {}))
    for name, service in services().items():
        for target, source in mounts(service).items():
            assert source.exists(), f"{name} mounts {source} (at {target}): not in the repo"
            assert source.is_relative_to(REPO), source
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_images_are_pinned_or_built_here() -> None:
    for name, service in services().items():
        image = service["image"]
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert (context / service["build"].get("dockerfile", "Dockerfile")).exists(), name
        else:
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image


# What each kind of service serves, for its healthcheck: (port, path) pairs.
def served(name: str, service: dict[str, Any]) -> set[tuple[int, str]]:
    if name in GATEWAYS:
        admin = gateway_settings(name).admin.port
        return {(admin, "/healthz"), (admin, "/readyz")}
    if name in MODELS:
        # the model server's test hook: never delayed or failed by --latency-ms / --error-rate
        return {(int(option(service["command"], "--port")), "/_bytes/0")}
    if name == "prometheus":
        return {(9090, "/-/healthy"), (9090, "/-/ready")}
    if name == "grafana":
        return {(3000, "/api/health")}
    return set()


def test_every_healthcheck_calls_an_endpoint_the_service_serves() -> None:
    for name, service in services().items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        if name == "redis":
            assert service["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
            continue
        url = urlsplit(healthcheck_url(service))
        assert url.hostname == "127.0.0.1", name
        assert (url.port, url.path) in served(name, service), f"{name}: {url.geturl()}"


def test_model_servers_listen_beyond_loopback_inside_their_container() -> None:
    for name, variant in MODELS.items():
        argv = services()[name]["command"]
        assert argv[:2] == ["gateway", "model-server"]
        assert option(argv, "--host") == "0.0.0.0"  # the default 127.0.0.1 is unreachable
        assert option(argv, "--name") == variant


def test_gateways_share_redis_and_an_operator_token() -> None:
    for name in GATEWAYS:
        service = services()[name]
        assert service["environment"]["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
        settings = gateway_settings(name)
        assert settings.store.kind == "redis" and urlsplit(settings.store.url).hostname == "redis"
        assert "operator" in {t.role for t in settings.admin.tokens}
        assert service["command"][:2] == ["gateway", "serve"]


def test_the_mounted_flags_are_valid_and_name_compose_services() -> None:
    for name in GATEWAYS:
        settings = gateway_settings(name)
        flags_file = mounts(services()[name])[settings.store.flags_file]
        flag_set = parse_flag_set(yaml.safe_load(flags_file.read_text()))
        assert flag_set.flags, "the compose flags file has no flag"
        for flag in flag_set.flags:
            arms = [flag.stable, flag.canary, *flag.variants, *flag.shadows]
            for arm in (a for a in arms if a is not None):
                url = urlsplit(arm.upstream)
                assert url.hostname in MODELS, f"{flag.key}/{arm.name}: {arm.upstream}"
                model = services()[url.hostname]["command"]
                assert url.port == int(option(model, "--port")), arm.upstream
                assert option(model, "--name") == arm.name, arm.upstream


def test_prometheus_scrapes_every_gateway_and_loads_the_rules(tmp_path: Path) -> None:
    service = services()["prometheus"]
    config_path = option_value(service["command"], "--config.file")
    files = mounts(service)
    config = yaml.safe_load(files[config_path].read_text())
    assert files[config["rule_files"][0]] == RULES.resolve()
    (job,) = config["scrape_configs"]
    targets = {t for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"{g}:{gateway_settings(g).admin.port}" for g in GATEWAYS}
    # promtool resolves rule files: point it at the repo's copy
    config["rule_files"] = [str(RULES)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(local))
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_gets_the_dashboard_where_its_provisioning_looks() -> None:
    files = mounts(services()["grafana"])
    provisioning = files["/etc/grafana/provisioning"]
    providers = yaml.safe_load((provisioning / "dashboards" / "gateway.yaml").read_text())
    folder = providers["providers"][0]["options"]["path"]
    dashboards = {t: s for t, s in files.items() if t.startswith(folder + "/")}
    assert dashboards == {f"{folder}/gateway.json": (DEPLOY / "grafana" / "gateway.json")}
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    url = urlsplit(sources["datasources"][0]["url"])
    assert url.hostname in services() and url.port == 9090


def option_value(argv: list[str], name: str) -> str:
    for arg in argv:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    pytest.fail(f"{name} not in {shlex.join(argv)}")
