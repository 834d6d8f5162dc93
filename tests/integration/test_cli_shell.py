"""The CLI as a shell script uses it, against a real gateway process: the documented exit codes,
`--json` shapes, `flags get -o yaml | flags apply -`, `flags delete`, `flags status --watch`
under a real pseudo-terminal, `--version`, and `serve`'s start-up line and its errors.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import GATEWAY_BIN, GatewayProcess, flag_doc, free_port
from test_admin import (  # the admin API tests' gateway, tokens and helpers
    NOWHERE,
    OPERATOR,
    OTHER_OPERATOR,
    SECRETS,
    TOKENS,
    VIEWER,
    AdminGateway,
    Spawn,
    module_spawn,  # noqa: F401 - a fixture
    start_gateway,
)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_CONFLICT = 0, 1, 2, 3, 4
CLEAR = "\x1b[H\x1b[2J"


@pytest.fixture(scope="module")
def gw(module_spawn: Spawn, tmp_path_factory: pytest.TempPathFactory) -> AdminGateway:  # noqa: F811
    flags = flag_doc(NOWHERE, "http://127.0.0.1:10", weight=0.05, hold="1h")
    return start_gateway(module_spawn, tmp_path_factory.mktemp("gw"), flags)


def env_for(admin_url: str, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_ADMIN_URL"] = admin_url
    if token is not None:
        env["GATEWAY_TOKEN"] = token
    return env


def cli(
    admin_url: str, *args: str, token: str | None = OPERATOR, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(GATEWAY_BIN), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env_for(admin_url, token),
        timeout=60,
    )
    for secret in SECRETS:
        assert secret not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


def a_flag(key: str) -> dict[str, Any]:
    """A document using most of the format: durations as written, rules, a guard, a shadow."""
    return {
        "key": key,
        "route": {"path_prefix": f"/{key}", "methods": ["POST"]},
        "unit": {"from": "header", "name": "x-user-id", "on_missing": "stable"},
        "stable": {"name": "v1", "upstream": NOWHERE},
        "canary": {"name": "v2", "upstream": "http://127.0.0.1:10"},
        "schedule": {"kind": "step", "steps": [{"weight": 0.01, "hold": "1h30m"}]},
        "guard": {"e0": 0.01, "e1": 0.05, "alpha": 0.01, "beta": 0.1},
        "shadows": [{"name": "v3", "upstream": "http://127.0.0.1:11", "sample": 0.25}],
        "rules": [{"if": {"header": "x-canary", "equals": "always"}, "then": "canary"}],
    }


def put(gw: AdminGateway, doc: dict[str, Any]) -> None:
    with gw.client() as api:
        assert api.put(f"/admin/flags/{doc['key']}", json=doc).status_code == 201


def test_get_as_yaml_piped_to_apply_is_a_no_op(gw: AdminGateway) -> None:
    put(gw, a_flag("roundtrip"))
    got = cli(gw.admin_url, "flags", "get", "roundtrip", "-o", "yaml", token=VIEWER)
    assert got.returncode == EXIT_OK, got.stderr
    assert yaml.safe_load(got.stdout) == {"flags": [a_flag("roundtrip")]}
    with gw.client() as api:
        events = len(api.get("/admin/audit", params={"flag": "roundtrip"}).json()["events"])

    applied = cli(gw.admin_url, "flags", "apply", "-", stdin=got.stdout)
    assert applied.returncode == EXIT_OK, applied.stderr
    assert applied.stdout.splitlines() == ["roundtrip: unchanged (version 1)"]
    with gw.client() as api:
        assert api.get("/admin/flags/roundtrip").json()["version"] == 1
        after = api.get("/admin/audit", params={"flag": "roundtrip"}).json()["events"]
    assert len(after) == events  # nothing was written


def test_json_is_the_admin_apis_answer(gw: AdminGateway) -> None:
    put(gw, a_flag("shapes"))
    with gw.client(VIEWER) as api:
        expected = {
            ("flags", "list"): api.get("/admin/flags").json(),
            ("flags", "get", "shapes"): api.get("/admin/flags/shapes").json(),
            ("flags", "history", "shapes"): api.get(
                "/admin/audit", params={"flag": "shapes", "limit": 20}
            ).json(),
        }
        status = api.get("/admin/flags/shapes/status").json()
    for args, answer in expected.items():
        done = cli(gw.admin_url, *args, "--json", token=VIEWER)
        assert done.returncode == EXIT_OK, (args, done.stderr)
        assert json.loads(done.stdout) == answer, args
    done = cli(gw.admin_url, "flags", "status", "shapes", "--json", token=VIEWER)
    got = json.loads(done.stdout)
    assert set(got) == set(status) and got["key"] == "shapes" and got["state"] == "running"


def test_delete_sends_if_match_and_keeps_a_flag_changed_meanwhile(gw: AdminGateway) -> None:
    put(gw, a_flag("doomed"))
    with gw.client(OTHER_OPERATOR) as api:
        edit = {**a_flag("doomed"), "salt": "changed"}
        assert api.put("/admin/flags/doomed", json=edit, headers={"If-Match": "1"}).is_success
    stale = cli(gw.admin_url, "flags", "delete", "doomed", "--if-match", "1")
    assert stale.returncode == EXIT_CONFLICT, stale.stderr
    assert "conflict (409)" in stale.stderr
    viewer = cli(gw.admin_url, "flags", "delete", "doomed", token=VIEWER)
    assert viewer.returncode == EXIT_REFUSED and "not allowed (403)" in viewer.stderr
    with gw.client() as api:
        assert api.get("/admin/flags/doomed").json()["version"] == 2

    gone = cli(gw.admin_url, "flags", "delete", "doomed", "--reason", "retired")
    assert gone.returncode == EXIT_OK, gone.stderr
    assert gone.stdout.strip() == "doomed: deleted (was version 2)"
    with gw.client() as api:
        assert api.get("/admin/flags/doomed").status_code == 404
        events = api.get("/admin/audit", params={"flag": "doomed"}).json()["events"]
    assert (events[0]["action"], events[0]["actor"], events[0]["reason"]) == (
        "delete",
        "alice",
        "retired",
    )
    again = cli(gw.admin_url, "flags", "delete", "doomed")
    assert again.returncode == EXIT_REFUSED and "no flag 'doomed' (404)" in again.stderr


def test_exit_codes_are_as_documented(gw: AdminGateway, tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    bad = tmp_path / "bad.yaml"
    bad.write_text("flags: [{key: x}]\n")
    cases: list[tuple[int, tuple[str, ...], str | None]] = [
        (EXIT_OK, ("flags", "list"), VIEWER),
        (EXIT_OK, ("--version",), None),
        (EXIT_REFUSED, ("flags", "list"), "wrong-token-0000"),
        (EXIT_REFUSED, ("flags", "get", "nope"), VIEWER),
        (EXIT_REFUSED, ("pause", sanitised := "sentiment", "--reason", "x"), VIEWER),
        (EXIT_REFUSED, ("flags", "apply", str(bad)), OPERATOR),
        (EXIT_USAGE, ("flags", "list", "--no-such-option"), VIEWER),
        (EXIT_USAGE, ("flags", "get"), VIEWER),
        (EXIT_USAGE, ("flags", "get", "sentiment", "-o", "xml"), VIEWER),
        (EXIT_CONFLICT, ("flags", "delete", sanitised, "--if-match", "99"), OPERATOR),
    ]
    for code, args, token in cases:
        done = cli(gw.admin_url, *args, token=token)
        assert done.returncode == code, (args, done.stdout, done.stderr)
    for args in (("flags", "list"), ("flags", "status", "sentiment"), ("flags", "delete", "x")):
        done = cli(nobody, *args)
        assert done.returncode == EXIT_UNREACHABLE, (args, done.stderr)
        assert done.stderr.startswith(f"cannot reach the gateway's admin API at {nobody}")


def test_version_is_the_package_version(gw: AdminGateway) -> None:
    from importlib.metadata import version

    done = cli(gw.admin_url, "--version", token=None)
    assert done.stdout.strip() == f"gateway {version('canary-gateway')}"


def read_screen(fd: int, until: Callable[[str], bool], deadline_s: float = 30.0) -> str:
    screen = ""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and not until(screen):
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                screen += os.read(fd, 65536).decode(errors="replace")
            except OSError:  # the child closed its end
                break
    return screen


def test_status_watch_redraws_in_a_terminal(gw: AdminGateway) -> None:
    controller, terminal = pty.openpty()
    argv = [str(GATEWAY_BIN), "flags", "status", "sentiment", "--watch", "--interval", "0.5"]
    process = subprocess.Popen(
        argv,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env_for(gw.admin_url, VIEWER),
        start_new_session=True,
    )
    os.close(terminal)
    try:
        screen = read_screen(controller, lambda s: s.count(CLEAR) >= 3)
        frames = [f for f in screen.split(CLEAR) if f.strip()]
        assert len(frames) >= 2, screen
        for frame in frames[:2]:
            lines = frame.replace("\r", "").splitlines()
            assert lines[0].startswith("every 0.5s: gateway flags status sentiment"), lines
            assert "sentiment: running, canary weight 5.00%, step 1/1" in lines, lines
            # "in 59m58s (16:05:02 UTC)", or "in 1h0m" within a second of the start: a relative
            # time, not a timestamp with microseconds
            next_change = next(line for line in lines if "next change:" in line)
            relative = r"next change: in \d+[hm](\d+[ms])? \(\d\d:\d\d:\d\d UTC\)"
            assert re.search(relative, next_change), next_change
            assert any(line.strip().startswith("watching: no evidence") for line in lines)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == EXIT_OK
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)


# --- serve -------------------------------------------------------------------------------------


def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run(
        [str(GATEWAY_BIN), "serve", "--host", "127.0.0.1", "--port", str(free_port()),
         "--admin-port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**clean, **(env or {})},
    )  # fmt: skip
    return done.returncode, done.stderr


def test_serve_with_a_broken_flags_file_lists_the_problems_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "flags.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "flags": [
                    {"key": "Bad Key", "route": {"path_prefix": "/a"}, "stable": {"name": "v1"}},
                    {"key": "ok", "route": {"path_prefix": "/b"}, "stable": {"upstream": "ftp://"}},
                ]
            }
        )
    )
    code, stderr = serve(tmp_path, "--flags", str(bad))
    assert code == 1
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert lines, stderr
    assert all(line.startswith(f"{bad}: flags[") for line in lines), lines
    assert any(line.startswith(f"{bad}: flags[0].key: ") for line in lines)
    assert any(line.startswith(f"{bad}: flags[1].stable.upstream: ") for line in lines)

    (tmp_path / "broken.yaml").write_text("flags: [unclosed\n")
    code, stderr = serve(tmp_path, "--flags", "broken.yaml")
    assert code == 1 and "Traceback" not in stderr
    assert stderr.startswith("broken.yaml: $: not valid YAML"), stderr  # path: message, as above
    code, stderr = serve(tmp_path, "--flags", "missing.yaml")
    assert code == 1 and stderr.strip() == "missing.yaml: cannot read: No such file or directory"

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(flag_doc(NOWHERE, None)))
    env = {"GATEWAY_UPSTREAM__READ_TIMEOUT_S": "soon", "GATEWAY_UPSTREAM__RETRIES": "3"}
    code, stderr = serve(tmp_path, "--flags", str(good), env=env)
    assert code == 1 and "Traceback" not in stderr
    assert stderr.splitlines() == [  # every problem at once
        "GATEWAY_UPSTREAM__RETRIES: no setting 'upstream.retries' (GATEWAY_ + path joined by __)",
        "upstream.read_timeout_s (from GATEWAY_UPSTREAM__READ_TIMEOUT_S): Input should be a "
        "valid number, unable to parse string as a number",
    ]
    code, stderr = serve(
        tmp_path, "--flags", str(good), env={"GATEWAY_UPSTREAM__READ_TIMEOUT_S": "soon"}
    )
    assert code == 1 and stderr.startswith(
        "upstream.read_timeout_s (from GATEWAY_UPSTREAM__READ_TIMEOUT_S): Input should be a valid"
    ), stderr


def test_serve_logs_one_start_up_line(gateway_server: Callable[..., GatewayProcess]) -> None:
    gw = gateway_server(flag_doc(NOWHERE, None), env={"GATEWAY_ADMIN_TOKENS": TOKENS})
    lines = [line for line in gw.server.log().splitlines() if "gateway.serve" in line]
    assert len(lines) == 1, gw.server.log()
    line = lines[0]
    assert f"data 127.0.0.1:{gw.server.port}, admin 0.0.0.0:{gw.admin_port}" in line, line
    assert "store memory, 1 flag(s) in " in line, line
    assert "server fast, client httptools," in line, line


def test_the_direct_client_loads_when_asked_for_on_the_pinned_aiohttp(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    env = {"GATEWAY_ADMIN_TOKENS": TOKENS, "GATEWAY_UPSTREAM__CLIENT": "aiohttp-direct"}
    gw = gateway_server(flag_doc(NOWHERE, None), env=env)
    line = next(line for line in gw.server.log().splitlines() if "gateway.serve" in line)
    assert "server fast, client aiohttp-direct," in line, line
    # On the aiohttp the pins allow, the direct client loads: no fallback warning.
    assert "aiohttp-direct is not used" not in gw.server.log(), gw.server.log()


def test_metrics_name_the_build_and_have_no_created_series(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    from importlib.metadata import version

    gw = gateway_server(flag_doc(NOWHERE, None), settings={"upstream": {"client": "httpx"}})
    with httpx.Client(base_url=gw.url, timeout=10) as data:
        data.get("/v1/sentiment/x")  # a request, so that counters and histograms have children
    text = httpx.get(f"{gw.admin_url}/metrics", timeout=10).text
    build = [line for line in text.splitlines() if line.startswith("gateway_build_info{")]
    labels = f'client="httpx",server="fast",version="{version("canary-gateway")}"'
    assert build == [f"gateway_build_info{{{labels}}} 1.0"]
    assert "gateway_requests_total{" in text
    assert [line for line in text.splitlines() if "_created" in line] == []
