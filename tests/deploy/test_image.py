"""The Dockerfile, checked without Docker (hadolint lints it in `make lint`): what it copies is
in the build context, it runs as a non-root user, and its HEALTHCHECK command works against a
real gateway."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from conftest import flag_doc, free_port
from promql import DEPLOY, REPO

from gateway.settings import load_settings

DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    """The arguments of every `name` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [m.group(1).strip() for m in re.finditer(rf"^{name} (.+)$", joined, re.MULTILINE)]


def healthcheck_argv() -> list[str]:
    (healthcheck,) = instructions("HEALTHCHECK")
    argv: list[str] = json.loads(healthcheck.split(" CMD ", 1)[1])
    return argv


def test_multi_stage_on_slim_python_3_11() -> None:
    stages = instructions("FROM")
    assert len(stages) >= 2
    assert all(re.fullmatch(r"python:3\.11-slim[\w.-]* AS \w+", s) for s in stages), stages


def test_runs_as_a_numeric_non_root_user() -> None:
    (user,) = instructions("USER")
    uid, gid = user.split(":")
    assert int(uid) > 0 and int(gid) > 0


def test_command_serves_with_the_baked_settings() -> None:
    (cmd,) = instructions("CMD")
    assert json.loads(cmd) == ["gateway", "serve", "--config", "/etc/gateway/gateway.yaml"]
    settings = load_settings(DEPLOY / "docker" / "gateway.yaml", env={})
    assert settings.listen.host == settings.admin.host == "0.0.0.0"
    exposed = {int(p) for p in instructions("EXPOSE")[0].split()}
    assert exposed == {settings.listen.port, settings.admin.port}
    assert healthcheck_argv() == ["python", "-m", "gateway.healthcheck"]


def test_baked_flags_point_at_no_loopback_address() -> None:
    """127.0.0.1 in a container is the container itself: no flag baked in may use it."""
    baked = [c.split()[0] for c in instructions("COPY") if c.split()[-1].endswith("flags.yaml")]
    assert baked, "the image bakes a flags file for the settings' store.flags_file"
    for source in baked:
        text = (REPO / source).read_text()
        assert "127.0.0.1" not in text and "localhost" not in text, source
        load_settings(DEPLOY / "docker" / "gateway.yaml", env={})
        from gateway.flagstore import read_flags_file

        read_flags_file(REPO / source)  # a valid flags file


def test_copied_files_are_in_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def sent(path: str) -> bool:
        included = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                included = negated
        return included

    for copy in instructions("COPY"):
        if copy.startswith("--from="):
            continue
        *sources, _ = copy.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repo"
            assert sent(source), f"COPY {source}: excluded by .dockerignore"


def test_healthcheck_follows_the_configured_admin_port(
    gateway_server: Callable[..., Any], tmp_path: Any
) -> None:
    # liveness needs no upstream: the flag's stable points at a port nobody listens on
    gw = gateway_server(flag_doc(f"http://127.0.0.1:{free_port()}", None))
    argv = healthcheck_argv()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}

    def probe(env: dict[str, str]) -> int:
        command = [sys.executable, *argv[1:]]
        return subprocess.run(command, capture_output=True, env={**clean, **env}).returncode

    settings = tmp_path / "gateway.yaml"
    settings.write_text(f"admin: {{host: 0.0.0.0, port: {gw.admin_port}}}\n")
    assert probe({"GATEWAY_CONFIG": str(settings)}) == 0  # the port from the settings file
    assert probe({"GATEWAY_ADMIN__PORT": str(gw.admin_port)}) == 0  # ... or the environment
    assert probe({"GATEWAY_ADMIN__PORT": str(free_port())}) != 0  # nobody there
    assert probe({"GATEWAY_ADMIN__PORT": "not-a-port"}) != 0
