"""The online CLI (`gateway flags apply|list|get|history`, `gateway assign KEY UNIT`) as a real
subprocess against a real gateway process, with GATEWAY_TOKEN and GATEWAY_ADMIN_URL in its env.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import flag_doc, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from test_admin import (  # the admin API tests' gateway, tokens and helpers
    NOWHERE,
    OPERATOR,
    OTHER_OPERATOR,
    SECRETS,
    VIEWER,
    AdminGateway,
    Spawn,
    module_spawn,  # noqa: F401 - a fixture
    one_flag,
    start_gateway,
)

# `gateway` with the online verbs registered, until gateway/cli/__init__.py registers them.
CLI = [
    sys.executable,
    "-c",
    "import sys; import gateway.cli.online; from gateway.cli import main; "
    "sys.argv[0] = 'gateway'; main()",
]


@pytest.fixture(scope="module")
def gw(module_spawn: Spawn, tmp_path_factory: pytest.TempPathFactory) -> AdminGateway:  # noqa: F811
    """One gateway for the module; each test works on flags (keys, prefixes) of its own."""
    return start_gateway(module_spawn, tmp_path_factory.mktemp("gw"), flag_doc(NOWHERE, None))


def cli(
    admin_url: str, *args: str, token: str | None = OPERATOR
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_TOKEN", "GATEWAY_ADMIN_URL")}
    env["GATEWAY_ADMIN_URL"] = admin_url
    if token is not None:
        env["GATEWAY_TOKEN"] = token
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=60)
    for secret in SECRETS:
        assert secret not in done.stdout + done.stderr  # the CLI never prints a token
    return done


def write(tmp_path: Path, *flags: dict[str, Any], name: str = "apply.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"flags": list(flags)}, sort_keys=False))
    return path


def flag(key: str, **kw: Any) -> dict[str, Any]:
    return one_flag(key=key, prefix=f"/{key}", **kw)


def create(gw: AdminGateway, *docs: dict[str, Any]) -> None:
    with gw.client() as api:
        for doc in docs:
            assert api.put(f"/admin/flags/{doc['key']}", json=doc).status_code == 201


def versions(gw: AdminGateway, *keys: str) -> dict[str, int]:
    with gw.client(VIEWER) as api:
        flags = api.get("/admin/flags").json()["flags"]
    return {f["key"]: f["version"] for f in flags if f["key"] in keys}


def audit(gw: AdminGateway, key: str) -> list[dict[str, Any]]:
    with gw.client(VIEWER) as api:
        return list(api.get("/admin/audit", params={"flag": key}).json()["events"])


# --- flags apply -------------------------------------------------------------------------------


def test_apply_dry_run_shows_the_diff_and_changes_nothing_then_apply_does(
    gw: AdminGateway, tmp_path: Path
) -> None:
    create(gw, flag("moved"), flag("kept"))
    moved = flag("moved")
    moved["stable"]["upstream"] = "http://127.0.0.1:10"
    added = flag("added")
    file = write(tmp_path, moved, flag("kept"), added)
    keys = ("moved", "kept", "added")

    dry = cli(gw.admin_url, "flags", "apply", str(file), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "moved: 1 change(s) to version 1",
        '  ~ stable.upstream: "http://127.0.0.1:9" → "http://127.0.0.1:10"',
        "kept: unchanged (version 1)",
        "added: create (new flag)",
        *(f"  + {field}: {json.dumps(value)}" for field, value in added.items()),
        "dry run: nothing was changed",
    ]
    assert versions(gw, *keys) == {"moved": 1, "kept": 1}
    assert [e["action"] for e in audit(gw, "moved")] == ["create"]

    done = cli(gw.admin_url, "flags", "apply", str(file), "--reason", "new pool")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [
        "moved: applied, now version 2",
        "added: created, now version 1",
    ]
    assert versions(gw, *keys) == {"moved": 2, "kept": 1, "added": 1}
    with gw.client(VIEWER) as api:
        assert api.get("/admin/flags/moved").json()["document"] == moved
        assert api.get("/admin/flags/added").json()["document"] == added
    assert [(e["action"], e["actor"], e["reason"]) for e in audit(gw, "moved")] == [
        ("replace", "alice", "new pool"),
        ("create", "alice", ""),
    ]

    again = cli(gw.admin_url, "flags", "apply", str(file))
    assert again.returncode == 0, again.stderr
    assert "moved: unchanged (version 2)" in again.stdout.splitlines()
    assert versions(gw, *keys) == {"moved": 2, "kept": 1, "added": 1}


def test_apply_dry_run_states_what_each_edit_does_to_the_rollout(
    gw: AdminGateway, tmp_path: Path
) -> None:
    create(gw, flag("halted", canary="http://127.0.0.1:10"))
    with gw.client() as api:
        assert api.post("/admin/flags/halted/rollback", json={"reason": "bad"}).status_code == 200
    rescheduled = flag("halted", canary="http://127.0.0.1:10", hold="2h")
    fresh = flag("fresh", canary="http://127.0.0.1:10")
    dry = cli(gw.admin_url, "flags", "apply", str(write(tmp_path, rescheduled, fresh)), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[:3] == [
        "halted: 1 change(s) to version 1",
        '  ~ schedule.steps[0].hold: "1h" → "2h"',
        "  rollout: stays rolled back",
    ]
    assert "  rollout: starts a new rollout" in lines[lines.index("fresh: create (new flag)") :]

    moved = flag("halted", canary="http://127.0.0.1:11")
    dry = cli(gw.admin_url, "flags", "apply", str(write(tmp_path, moved)), "--dry-run")
    assert "  rollout: starts a new rollout" in dry.stdout.splitlines(), dry.stdout


def stale_edit_proxy(admin_url: str, key: str, uvicorn_app: Callable[..., Any]) -> str:
    """A real HTTP hop in front of the admin API where another operator edits `key` right
    after apply read it, so that apply's write carries a stale If-Match."""
    passed = ("authorization", "if-match", "content-type", "x-gateway-reason")

    async def forward(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k in passed}
        async with httpx.AsyncClient(base_url=admin_url) as client:
            answer = await client.request(
                request.method,
                request.url.path,
                params=request.query_params,
                headers=headers,
                content=await request.body(),
            )
            if request.method == "GET" and request.url.path == f"/admin/flags/{key}":
                edit = {**answer.json()["document"], "salt": "edited-meanwhile"}
                other = {"Authorization": f"Bearer {OTHER_OPERATOR}", "If-Match": "1"}
                edited = await client.put(f"/admin/flags/{key}", json=edit, headers=other)
                assert edited.status_code == 200, edited.text
        return Response(answer.content, answer.status_code, media_type="application/json")

    app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "PUT"])])
    return str(uvicorn_app(app, lifespan="off").url)


def test_a_stale_concurrent_edit_is_a_conflict(
    gw: AdminGateway, uvicorn_app: Callable[..., Any], tmp_path: Path
) -> None:
    create(gw, flag("contested"))
    mine = flag("contested")
    mine["stable"]["upstream"] = "http://127.0.0.1:10"
    proxy = stale_edit_proxy(gw.admin_url, "contested", uvicorn_app)

    done = cli(proxy, "flags", "apply", str(write(tmp_path, mine, flag("bystander"))))
    assert done.returncode == 4  # a conflict: documented exit code
    assert done.stderr.splitlines() == [
        "contested: conflict (409): flag 'contested' is at version 2, not 1: re-read it and retry",
        "1 of 2 flag(s) not applied",
    ]
    assert "bystander: created, now version 1" in done.stdout.splitlines()
    with gw.client(VIEWER) as api:
        kept = api.get("/admin/flags/contested").json()
    assert kept["version"] == 2
    assert kept["document"]["salt"] == "edited-meanwhile"  # the other edit was not overwritten
    assert kept["document"]["stable"]["upstream"] == NOWHERE


def test_apply_validates_locally_and_reports_server_rejections(
    gw: AdminGateway, tmp_path: Path
) -> None:
    broken = flag("broken", canary="ftp://x")
    broken["guard"] = {"e0": 0.5, "e1": 0.1}
    file = write(tmp_path, broken, {"key": "half"})
    bad = cli(gw.admin_url, "flags", "apply", str(file))
    assert bad.returncode == 1 and bad.stdout == ""
    problems = bad.stderr.splitlines()
    assert (
        f"{file}: flags[0].canary.upstream: must be an http:// or https:// URL with a host, got 'ftp://x'"
        in problems
    )
    assert any(p.startswith(f"{file}: flags[0].guard") for p in problems), problems
    assert f"{file}: flags[1].route: required field is missing" in problems
    assert versions(gw, "broken", "half") == {}

    create(gw, flag("taken"))
    clash = flag("clash")
    clash["route"]["path_prefix"] = "/taken"  # valid on its own; the server has /taken
    rejected = cli(gw.admin_url, "flags", "apply", str(write(tmp_path, clash)))
    assert rejected.returncode == 1
    assert rejected.stderr.splitlines() == [
        "clash: rejected (422):",
        "  route: overlaps the route of flag 'taken' ('/taken')",
        "1 of 1 flag(s) not applied",
    ]
    assert versions(gw, "clash") == {}


# --- list, get, history, assign ----------------------------------------------------------------


def test_list_get_history_and_assign_print_what_the_api_says(
    gw: AdminGateway, tmp_path: Path
) -> None:
    split = flag("listed", canary="http://127.0.0.1:10", weight=0.5)
    split["route"]["methods"] = ["POST"]
    split["rules"] = [{"if": {"header": "x-canary", "equals": "always"}, "then": "canary"}]
    create(gw, split)
    listed = cli(gw.admin_url, "flags", "list", token=VIEWER)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == ["KEY", "VERSION", "ROUTE", "STABLE", "CANARY"]
    assert ["sentiment", "1", "/v1/sentiment", "v1", NOWHERE, "-"] in rows
    row = ["listed", "1", "/listed", "[POST]", "v1", NOWHERE, "v2", "http://127.0.0.1:10"]
    assert row in rows
    with gw.client(VIEWER) as api:
        assert len(rows) == 1 + len(api.get("/admin/flags").json()["flags"])

    got = cli(gw.admin_url, "flags", "get", "listed", token=VIEWER)
    assert got.returncode == 0, got.stderr
    with gw.client(VIEWER) as api:
        assert json.loads(got.stdout) == api.get("/admin/flags/listed").json()

    for salt in ("k2", "k3"):
        applied = cli(gw.admin_url, "flags", "apply", str(write(tmp_path, {**split, "salt": salt})))
        assert applied.returncode == 0, applied.stderr
    history = cli(gw.admin_url, "flags", "history", "listed", "--limit", "2", token=VIEWER)
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    assert len(lines) == 4, lines
    assert lines[0].split()[1:] == ["alice", "replace", "v2", "→", "v3"]
    assert lines[1] == '    ~ salt: "k2" → "k3"'
    assert lines[2].split()[1:] == ["alice", "replace", "v1", "→", "v2"]
    assert lines[3] == '    + salt: "k2"'
    as_json = cli(gw.admin_url, "flags", "history", "listed", "--json", token=VIEWER)
    assert json.loads(as_json.stdout) == {"events": audit(gw, "listed")}  # the API's answer

    units = [f"user-{i}" for i in range(5)]
    assigned = cli(gw.admin_url, "assign", "listed", units[0], *(f"--unit={u}" for u in units[1:]))
    assert assigned.returncode == 0, assigned.stderr
    with gw.client(VIEWER) as api:
        expected = [
            api.get("/admin/assign", params={"flag": "listed", "unit": u}).json() for u in units
        ]
    assert [json.loads(line) for line in assigned.stdout.splitlines()] == expected
    ruled = cli(gw.admin_url, "assign", "listed", "bob", "--header", "x-canary=always")
    assert ruled.returncode == 0, ruled.stderr
    assert (json.loads(ruled.stdout)["variant"], json.loads(ruled.stdout)["reason"]) == (
        "v2",
        "rule",
    )


# --- failures ----------------------------------------------------------------------------------


def test_clear_messages_for_refusals_and_an_unreachable_gateway(
    gw: AdminGateway, tmp_path: Path
) -> None:
    file = str(write(tmp_path, flag("denied")))

    no_token = cli(gw.admin_url, "flags", "list", token=None)
    assert no_token.returncode == 1
    assert no_token.stderr.startswith("refused (401): send Authorization: Bearer <token>")
    assert "GATEWAY_TOKEN" in no_token.stderr
    wrong = cli(gw.admin_url, "flags", "get", "sentiment", token="wrong-token-1234")
    assert wrong.returncode == 1 and "refused (401): unknown or revoked" in wrong.stderr
    viewer = cli(gw.admin_url, "flags", "apply", file, token=VIEWER)
    assert viewer.returncode == 1
    assert "denied: not allowed (403): token 'victor' has role viewer" in viewer.stderr
    missing = cli(gw.admin_url, "flags", "get", "nope")
    assert missing.returncode == 1 and missing.stderr.strip() == "no flag 'nope' (404)"
    assert versions(gw, "denied") == {}

    nobody = f"http://127.0.0.1:{free_port()}"
    for args in (["flags", "apply", file], ["assign", "sentiment", "u"]):
        down = cli(nobody, *args)
        assert down.returncode == 3, args  # unreachable: documented exit code
        assert down.stderr.startswith(f"cannot reach the gateway's admin API at {nobody}"), args
        assert "--admin-url" in down.stderr


def test_a_store_that_cannot_take_writes_is_reported(
    spawn: Spawn, tmp_path: Path, restartable_redis: Any
) -> None:
    gw = start_gateway(spawn, tmp_path, flag_doc(NOWHERE, None), redis_url=restartable_redis.url)
    file = write(tmp_path, one_flag(salt="x"))
    restartable_redis.stop()
    done = cli(gw.admin_url, "flags", "apply", str(file))
    assert done.returncode == 1
    # The current versions are read from the replica's snapshot (a stale read); the write is
    # what the store refuses.
    message = done.stderr.strip()
    assert message.startswith("sentiment: flag store unavailable (Redis at "), message
    assert " (503): try again when the flag store is back" in message, message
    assert message.endswith("1 of 1 flag(s) not applied"), message
    restartable_redis.start()
