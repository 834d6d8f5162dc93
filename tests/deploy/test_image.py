"""The Dockerfile, checked without Docker (hadolint lints it in `make lint`): what it copies is
in the build context, it runs as a non-root user, and its HEALTHCHECK command works against a
real gateway."""

from __future__ import annotations

import fnmatch
import json
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
    assert f"http://127.0.0.1:{settings.admin.port}/healthz" in " ".join(healthcheck_argv())


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


def test_healthcheck_command_passes_on_a_live_gateway_and_fails_without_one(
    gateway_server: Callable[..., Any],
) -> None:
    # liveness needs no upstream: the flag's stable points at a port nobody listens on
    gw = gateway_server(flag_doc(f"http://127.0.0.1:{free_port()}", None))
    argv = healthcheck_argv()
    assert argv[:2] == ["python", "-c"]

    def probe(port: int) -> int:
        code = argv[2].replace("127.0.0.1:9090", f"127.0.0.1:{port}")
        return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode

    assert probe(gw.admin_port) == 0
    assert probe(free_port()) != 0
