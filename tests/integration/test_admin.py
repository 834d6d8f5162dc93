"""The admin API end to end: a real gateway process, real model servers, real HTTP.

Covers flag CRUD with versions (ETag / If-Match), validation (422 listing every problem, route
overlaps), changes going live on the data plane, the audit (actor, diff, never a secret),
/admin/assign agreeing with the data plane, the auth matrix, a gateway with no tokens, a flag
store that cannot take writes (503), and the OpenAPI document.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mmh3
import pytest
import yaml
from conftest import GATEWAY_BIN, Server, flag_doc, free_port, running
from openapi_spec_validator import validate
from starlette.routing import Route

from gateway.admin.routes import admin_routes
from gateway.app import create_app
from gateway.settings import load_settings

OPERATOR, VIEWER = "op-secret-5f1e9c2a77", "view-secret-8d3b7e4190"
OTHER_OPERATOR = "ops-bot-secret-2c9d11aa"
TOKENS = f"alice:operator:{OPERATOR},victor:viewer:{VIEWER},deploy-bot:operator:{OTHER_OPERATOR}"
SECRETS = (OPERATOR, VIEWER, OTHER_OPERATOR)
NOWHERE = "http://127.0.0.1:9"  # a valid upstream for flags that never serve a request here


@dataclass(frozen=True, slots=True)
class AdminGateway:
    server: Server
    admin_port: int

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.server.log()

    def client(self, token: str | None = OPERATOR) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.admin_url, headers=headers, timeout=10)


Spawn = Callable[..., Server]


def start_gateway(
    spawn: Spawn,
    directory: Path,
    flags: dict[str, Any],
    *,
    tokens: str = TOKENS,
    redis_url: str | None = None,
) -> AdminGateway:
    """A gateway process serving `flags`, its admin API on a port of its own."""
    flags_file, settings_file = directory / "flags.yaml", directory / "gateway.yaml"
    flags_file.write_text(yaml.safe_dump(flags))
    settings_file.write_text("{}\n")
    admin = free_port()
    argv = [str(GATEWAY_BIN), "serve", "--config", str(settings_file), "--flags", str(flags_file)]
    server = spawn(
        lambda port: [
            *argv,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--admin-port",
            str(admin),
        ],
        ready=lambda _port: f"http://127.0.0.1:{admin}/readyz",
        env={"GATEWAY_ADMIN_TOKENS": tokens, "GATEWAY_REDIS_URL": redis_url or ""},
    )
    return AdminGateway(server, admin)


@pytest.fixture(scope="module")
def module_spawn() -> Iterator[Spawn]:
    """Like conftest's `spawn`, for processes the tests of one module share."""
    with contextlib.ExitStack() as stack:
        yield lambda argv, **kw: stack.enter_context(running(argv, **kw))


@pytest.fixture(scope="module")
def gw(module_spawn: Spawn, tmp_path_factory: pytest.TempPathFactory) -> AdminGateway:
    """One gateway for the module, holding `sentiment` (which no test changes). Each test
    creates flags of its own, with keys and route prefixes no other test uses."""
    return start_gateway(module_spawn, tmp_path_factory.mktemp("gw"), flag_doc(NOWHERE, None))


@pytest.fixture(scope="module")
def models(module_spawn: Spawn) -> dict[str, Server]:
    """Real model servers named alpha, beta and gamma (their name is in every answer)."""

    def argv(name: str) -> Callable[[int], list[str]]:
        return lambda port: [str(GATEWAY_BIN), "model-server", "--port", str(port), "--name", name]

    return {name: module_spawn(argv(name)) for name in ("alpha", "beta", "gamma")}


def one_flag(stable: str = NOWHERE, canary: str | None = None, **kw: Any) -> dict[str, Any]:
    return flag_doc(stable, canary, **kw)["flags"][0]


def without_key(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "key"}


def create(api: httpx.Client, key: str, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = doc if doc is not None else one_flag(key=key, prefix=f"/{key}")
    answer = api.put(f"/admin/flags/{key}", json=doc)
    assert answer.status_code == 201, answer.text
    return doc


# --- CRUD, versions, ETag, If-Match ------------------------------------------------------------


def test_crud_with_versions_etag_and_if_match(gw: AdminGateway) -> None:
    with gw.client() as api:
        listed = api.get("/admin/flags")
        assert listed.status_code == 200
        assert ("sentiment", 1) in [(f["key"], f["version"]) for f in listed.json()["flags"]]
        got = api.get("/admin/flags/sentiment")
        assert got.status_code == 200 and got.headers["etag"] == '"1"'
        assert got.json()["document"] == one_flag()
        absent = api.get("/admin/flags/crud")
        assert absent.status_code == 404 and absent.json()["error"] == "not_found"

        doc = without_key(one_flag(key="crud", prefix="/crud"))
        created = api.put("/admin/flags/crud", json=doc)
        assert created.status_code == 201, created.text
        assert created.headers["etag"] == '"1"'
        assert created.json() == {
            "key": "crud",
            "version": 1,
            "document": {"key": "crud", **doc},
            "rollout": "keeps",  # no canary: nothing rolls out
        }

        again = api.put("/admin/flags/crud", json=doc)
        assert again.status_code == 428 and again.json()["error"] == "precondition_required"
        stale = api.put("/admin/flags/crud", json=doc, headers={"If-Match": "5"})
        assert stale.status_code == 409
        assert stale.json()["error"] == "conflict" and stale.json()["current_version"] == 1
        quoted = api.put("/admin/flags/crud", json=doc, headers={"If-Match": '"1"'})
        assert quoted.status_code == 200 and quoted.json()["version"] == 2
        assert quoted.headers["etag"] == '"2"'
        bare = api.put("/admin/flags/crud", json=doc, headers={"If-Match": "2"})
        assert bare.status_code == 200 and bare.json()["version"] == 3
        assert api.put("/admin/flags/crud", json=doc, headers={"If-Match": "2"}).status_code == 409
        weak = api.put("/admin/flags/crud", json=doc, headers={"If-Match": "W/x"})
        assert weak.status_code == 400 and weak.json()["error"] == "bad_request"
        elsewhere = without_key(one_flag(prefix="/crud-gone"))
        gone = api.put("/admin/flags/crud-gone", json=elsewhere, headers={"If-Match": "1"})
        assert gone.status_code == 409 and gone.json()["current_version"] is None

        assert api.delete("/admin/flags/crud").status_code == 428
        assert api.delete("/admin/flags/crud", headers={"If-Match": "2"}).status_code == 409
        deleted = api.delete("/admin/flags/crud", headers={"If-Match": '"3"'})
        assert deleted.status_code == 204, deleted.text
        assert api.get("/admin/flags/crud").status_code == 404
        assert api.delete("/admin/flags/crud", headers={"If-Match": "3"}).status_code == 404
        assert "crud" not in [f["key"] for f in api.get("/admin/flags").json()["flags"]]


def test_bad_bodies(gw: AdminGateway) -> None:
    with gw.client() as api:
        not_json = api.put("/admin/flags/bodies", content=b"{nope")
        assert not_json.status_code == 422 and not_json.json()["errors"][0]["path"] == "$"
        assert api.put("/admin/flags/bodies", json=[1, 2]).status_code == 422
        wrong_key = api.put("/admin/flags/bodies", json=one_flag(key="other", prefix="/bodies"))
        assert wrong_key.status_code == 422
        assert wrong_key.json()["errors"] == [
            {"path": "key", "message": "must equal the key in the URL ('bodies'), got 'other'"}
        ]
        bad_key = api.put("/admin/flags/Bad_Key", json=without_key(one_flag(prefix="/bodies")))
        assert bad_key.status_code == 422 and bad_key.json()["errors"][0]["path"] == "key"
        assert api.put("/admin/flags/bodies", content=b" " * (1024 * 1024 + 1)).status_code == 413
        assert api.get("/admin/flags/bodies").status_code == 404


def test_422_lists_every_problem_and_keeps_the_flag(gw: AdminGateway) -> None:
    broken = one_flag(canary="ftp://not-http", key="strict", prefix="/strict")
    broken["guard"] = {"e0": 0.2, "e1": 0.1}
    broken["surprise"] = True
    broken["variants"] = [{"name": "v1", "upstream": NOWHERE, "weight": 1.5}]
    broken["rules"] = [{"if": {"header": "x-canary", "equals": "always"}, "then": "nobody"}]
    with gw.client() as api:
        create(api, "strict")
        answer = api.put("/admin/flags/strict", json=broken, headers={"If-Match": "1"})
        assert answer.status_code == 422
        body = answer.json()
        assert body["error"] == "invalid"
        paths = {e["path"] for e in body["errors"]}
        assert {"canary.upstream", "surprise", "variants[0].weight", "rules[0].then"} <= paths
        assert "variants[0].name" in paths  # the same name as stable's
        assert any(p.startswith("guard") for p in paths), paths
        kept = api.get("/admin/flags/strict").json()
        assert kept["version"] == 1 and "surprise" not in kept["document"]


def test_retired_relative_mode_fields_and_a_ratio_of_one_get_422_naming_ratio(
    gw: AdminGateway,
) -> None:
    with gw.client() as api:
        create(api, "relative")
        before = api.get("/admin/flags/relative").json()
        old_style = one_flag(key="relative", prefix="/relative")
        old_style["guard"] = {"mode": "relative", "epsilon": 0.005, "window": "5m"}
        answer = api.put("/admin/flags/relative", json=old_style, headers={"If-Match": "1"})
        assert answer.status_code == 422, answer.text
        errors = {e["path"]: e["message"] for e in answer.json()["errors"]}
        assert set(errors) == {"guard.epsilon", "guard.window"}, errors
        assert all("ratio" in message for message in errors.values()), errors
        for ratio in (1, 0.5):
            flat = one_flag(key="relative", prefix="/relative")
            flat["guard"] = {"mode": "relative", "ratio": ratio}
            answer = api.put("/admin/flags/relative", json=flat, headers={"If-Match": "1"})
            assert answer.status_code == 422, answer.text
            [error] = answer.json()["errors"]
            assert error["path"] == "guard.ratio" and "greater than 1" in error["message"], error
        assert api.get("/admin/flags/relative").json() == before  # the good state stays
        good = one_flag(key="relative", prefix="/relative")
        good["guard"] = {"mode": "relative", "ratio": 3}
        accepted = api.put("/admin/flags/relative", json=good, headers={"If-Match": "1"})
        assert accepted.status_code == 200, accepted.text


def test_overlapping_route_is_rejected(gw: AdminGateway) -> None:
    with gw.client() as api:
        create(api, "base")
        clash = api.put("/admin/flags/other", json=one_flag(key="other", prefix="/base/"))
        assert clash.status_code == 422
        assert clash.json()["errors"] == [
            {"path": "route", "message": "overlaps the route of flag 'base' ('/base')"}
        ]
        hosted = one_flag(key="other", prefix="/base")
        hosted["route"]["host"] = "a.example"  # `base` takes every host
        assert api.put("/admin/flags/other", json=hosted).status_code == 422
        hosted["route"]["path_prefix"] = "/base/batch"
        assert api.put("/admin/flags/other", json=hosted).status_code == 201
        same_route = one_flag(key="base", prefix="/base", salt="s2")  # never overlaps itself
        assert (
            api.put("/admin/flags/base", json=same_route, headers={"If-Match": "1"}).status_code
            == 200
        )


# --- live on the data plane --------------------------------------------------------------------


def test_a_change_is_live_on_the_data_plane(gw: AdminGateway, models: dict[str, Server]) -> None:
    alpha, beta = models["alpha"].url, models["beta"].url

    def served(data: httpx.Client, path: str = "/live") -> tuple[str, str]:
        r = data.post(path, content=b"{}", headers={"x-user-id": "u1"})
        assert r.status_code == 200, r.text
        return r.headers["x-gateway-variant"], r.json()["model"]

    with gw.client() as api, httpx.Client(base_url=gw.url, timeout=10) as data:
        assert data.post("/live", content=b"{}").status_code == 404
        doc = create(api, "live", one_flag(alpha, key="live", prefix="/live"))
        assert served(data) == ("v1", "alpha")
        doc["stable"] = {"name": "v1b", "upstream": beta}
        assert api.put("/admin/flags/live", json=doc, headers={"If-Match": "1"}).status_code == 200
        assert served(data) == ("v1b", "beta")
        assert api.delete("/admin/flags/live", headers={"If-Match": "2"}).status_code == 204
        gone = data.post("/live", content=b"{}")
        assert gone.status_code == 404 and gone.json()["error"] == "no_route"


# --- audit -------------------------------------------------------------------------------------


def test_audit_names_the_actor_has_the_diff_and_no_secret(gw: AdminGateway) -> None:
    doc = one_flag(key="audited", prefix="/audited")
    changed = json.loads(json.dumps(doc))
    changed["stable"]["upstream"] = "http://127.0.0.1:10"
    changed["salt"] = "rank-2024"
    with gw.client() as alice, gw.client(OTHER_OPERATOR) as bot, gw.client(VIEWER) as victor:
        create(alice, "audited", doc)
        reason = {"X-Gateway-Reason": "move to the new pool", "If-Match": "1"}
        assert bot.put("/admin/flags/audited", json=changed, headers=reason).status_code == 200
        assert alice.delete("/admin/flags/audited", headers={"If-Match": "2"}).status_code == 204
        with gw.client("not-a-real-token-123") as stranger:
            assert stranger.get("/admin/audit").status_code == 401

        audit = victor.get("/admin/audit", params={"flag": "audited"})
        assert audit.status_code == 200
        events = audit.json()["events"]
        summary = [
            (e["action"], e["actor"], e["version_before"], e["version_after"]) for e in events
        ]
        assert summary == [
            ("delete", "alice", 2, None),
            ("replace", "deploy-bot", 1, 2),
            ("create", "alice", None, 1),
        ]
        assert events[1]["reason"] == "move to the new pool"
        assert events[1]["diff"] == [
            {"path": "stable.upstream", "op": "changed", "before": NOWHERE,
             "after": "http://127.0.0.1:10"},
            {"path": "salt", "op": "added", "before": None, "after": "rank-2024"},
        ]  # fmt: skip
        assert {c["path"] for c in events[2]["diff"]} == set(doc)  # created: every field added
        assert all(c["op"] == "added" for c in events[2]["diff"])
        assert {c["path"] for c in events[0]["diff"]} == set(changed)  # deleted: every field
        assert events[0]["time"].endswith("Z") and events[0]["ts"] >= events[2]["ts"]

        assert len(victor.get("/admin/audit", params={"limit": 2}).json()["events"]) == 2
        assert victor.get("/admin/audit", params={"flag": "sentiment"}).json()["events"] == []
        assert victor.get("/admin/audit", params={"limit": 0}).status_code == 422
        assert victor.get("/admin/audit", params={"limit": "x"}).status_code == 422
        everything = victor.get("/admin/audit").text

    for secret in (*SECRETS, "not-a-real-token-123"):
        assert secret not in everything
        assert secret not in gw.log()
    assert "alice" in gw.log()  # the log names who wrote, so the check above looked at it


# --- /admin/assign -----------------------------------------------------------------------------


def test_assign_agrees_with_the_data_plane(gw: AdminGateway, models: dict[str, Server]) -> None:
    flag = one_flag(
        models["alpha"].url, models["beta"].url, weight=0.3, key="split", prefix="/split"
    )
    flag["variants"] = [{"name": "v3", "upstream": models["gamma"].url, "weight": 0.2}]
    flag["rules"] = [{"if": {"header": "x-canary", "equals": "always"}, "then": "canary"}]
    units = [f"user-{i}" for i in range(300)]

    def ask(**params: str) -> dict[str, Any]:
        answer = api.get("/admin/assign", params={"flag": "split", **params})
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    with gw.client() as api, httpx.Client(base_url=gw.url, timeout=10) as data:
        create(api, "split", flag)
        _wait_for_weight(api, "split", 0.3)
        said = {unit: ask(unit=unit) for unit in units}
        for unit in units:
            served = data.post("/split", content=b"{}", headers={"x-user-id": unit})
            assert said[unit]["variant"] == served.headers["x-gateway-variant"], unit
            assert said[unit]["bucket"] == mmh3.hash(f"split:{unit}", seed=0, signed=False) % 10000
            assert said[unit]["unit"] == unit and said[unit]["version"] == 1
        assert {a["reason"] for a in said.values()} == {"canary", "variant", "stable"}

        ruled = ask(unit="u", **{"header.x-canary": "always"})
        assert (ruled["variant"], ruled["role"], ruled["reason"]) == ("v2", "canary", "rule")
        assert ruled["upstream"] == models["beta"].url and ruled["state"] == "running"
        assert ask(**{"header.x-user-id": "user-7"}) == said["user-7"]
        no_unit = ask()
        assert (no_unit["variant"], no_unit["reason"], no_unit["unit"]) == (
            "v1",
            "missing-unit",
            None,
        )

        assert api.get("/admin/assign", params={"unit": "u"}).status_code == 422
        unknown = api.get("/admin/assign", params={"flag": "split", "color": "red"})
        assert unknown.status_code == 422 and unknown.json()["errors"][0]["path"] == "query.color"
        assert api.get("/admin/assign", params={"flag": "nope", "unit": "u"}).status_code == 404


def _wait_for_weight(api: httpx.Client, key: str, weight: float) -> None:
    """The controller sets a new flag's weight on its next tick (every 0.1 s)."""
    deadline = time.monotonic() + 5
    while api.get("/admin/assign", params={"flag": key}).json()["weight"] != weight:
        assert time.monotonic() < deadline, f"{key} never reached weight {weight}"
        time.sleep(0.05)


# --- auth --------------------------------------------------------------------------------------

# (method, path, needs operator, status for a caller that may)
ROUTES: list[tuple[str, str, bool, int]] = [
    ("GET", "/admin/flags", False, 200),
    ("GET", "/admin/flags/sentiment", False, 200),
    ("GET", "/admin/audit", False, 200),
    ("GET", "/admin/assign?flag=sentiment&unit=u", False, 200),
    ("PUT", "/admin/flags/tmp", True, 201),
    ("DELETE", "/admin/flags/tmp", True, 204),
]
PUBLIC = ("/healthz", "/readyz", "/metrics", "/admin/openapi.json")


def _call(http: httpx.Client, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    if method == "DELETE":
        headers = {**headers, "If-Match": "1"}
    body = one_flag(key="tmp", prefix="/tmp") if method == "PUT" else None
    return http.request(method, path, headers=headers, json=body)


def test_auth_matrix(gw: AdminGateway) -> None:
    refused = {
        "none": {},
        "wrong": {"Authorization": "Bearer wrong-secret-0000"},
        "basic": {"Authorization": f"Basic {OPERATOR}"},
        "empty": {"Authorization": "Bearer"},
    }
    viewer = {"Authorization": f"Bearer {VIEWER}"}
    operator = {"Authorization": f"bearer {OPERATOR}"}  # the scheme is case-insensitive
    with httpx.Client(base_url=gw.admin_url, timeout=10) as http:
        for method, path, needs_operator, allowed in ROUTES:
            for who, headers in refused.items():
                got = _call(http, method, path, headers)
                assert got.status_code == 401, (method, path, who, got.text)
                assert got.headers["www-authenticate"].startswith('Bearer realm="gateway-admin"')
                assert got.json()["error"] in ("unauthorized", "invalid_token")
            got = _call(http, method, path, viewer)
            assert got.status_code == (403 if needs_operator else allowed), (method, path, got.text)
            if needs_operator:
                assert (
                    got.json()["message"] == "token 'victor' has role viewer; this needs operator"
                )
            got = _call(http, method, path, operator)
            assert got.status_code == allowed, (method, path, got.text)
        for public in PUBLIC:
            assert http.get(public).status_code == 200, public


def test_no_tokens_configured_refuses_everything(spawn: Spawn, tmp_path: Path) -> None:
    bare = start_gateway(spawn, tmp_path, flag_doc(NOWHERE, None), tokens="")
    with httpx.Client(base_url=bare.admin_url, timeout=10) as http:
        for method, path, _, _ in ROUTES:
            for headers in ({}, {"Authorization": f"Bearer {OPERATOR}"}):
                got = _call(http, method, path, headers)
                assert got.status_code == 403, (method, path, got.text)
                assert got.json()["error"] == "admin_disabled"
                assert got.json()["message"].startswith("no admin tokens are configured: set ")
                assert "GATEWAY_ADMIN_TOKENS=name:role:secret" in got.json()["message"]
        for public in PUBLIC:
            assert http.get(public).status_code == 200, public


# --- the flag store away -----------------------------------------------------------------------


def test_writes_answer_503_while_redis_is_away(
    spawn: Spawn, tmp_path: Path, restartable_redis: Any
) -> None:
    gw = start_gateway(spawn, tmp_path, flag_doc(NOWHERE, None), redis_url=restartable_redis.url)
    changed = one_flag(salt="s2")
    with gw.client() as api:
        assert api.get("/admin/flags/sentiment").json()["version"] == 1
        restartable_redis.stop()
        put = api.put("/admin/flags/sentiment", json=changed, headers={"If-Match": "1"})
        assert put.status_code == 503, put.text
        assert put.json()["error"] == "store_unavailable"
        assert put.json()["message"].startswith("flag store unavailable (Redis at ")
        deleted = api.delete("/admin/flags/sentiment", headers={"If-Match": "1"})
        assert deleted.status_code == 503 and deleted.json()["error"] == "store_unavailable"
        created = api.put("/admin/flags/fresh", json=one_flag(key="fresh", prefix="/fresh"))
        assert created.status_code == 503
        # Reads are answered from the replica's snapshot meanwhile, marked stale.
        stale = api.get("/admin/flags/sentiment")
        assert stale.status_code == 200 and stale.json()["version"] == 1
        assert stale.headers["x-gateway-stale"].startswith("sync-age=")
        assert stale.json()["stale"]["sync_age_s"] >= 0

        restartable_redis.start()
        deadline = time.monotonic() + 10
        while "stale" in (got := api.get("/admin/flags/sentiment")).json():
            assert time.monotonic() < deadline, got.text
            time.sleep(0.1)
        assert "x-gateway-stale" not in got.headers
        assert got.json()["version"] == 1 and got.json()["document"] == one_flag()
        assert api.get("/admin/flags/fresh").status_code == 404  # nothing half-written
        put = api.put("/admin/flags/sentiment", json=changed, headers={"If-Match": "1"})
        assert put.status_code == 200 and put.json()["version"] == 2


# --- OpenAPI -----------------------------------------------------------------------------------


def _admin_routes() -> Iterator[Route]:
    gateway = create_app(load_settings(None, env={}, overrides={"store.flags_file": None}))
    for route in admin_routes(gateway):
        assert isinstance(route, Route)
        yield route


def test_openapi_is_valid_and_describes_every_route(gw: AdminGateway) -> None:
    with httpx.Client(base_url=gw.admin_url, timeout=10) as http:
        spec = http.get("/admin/openapi.json").json()
    validate(spec)
    for route in _admin_routes():
        described = spec["paths"].get(route.path)
        assert described is not None, route.path
        for method in (route.methods or set()) - {"HEAD"}:
            operation = described.get(method.lower())
            assert operation is not None, (method, route.path)
            if route.path != "/admin/openapi.json":
                assert {"401", "403"} <= set(operation["responses"]), (method, route.path)
    put = spec["paths"]["/admin/flags/{key}"]["put"]
    assert {"200", "201", "400", "409", "413", "422", "428", "503"} <= set(put["responses"])
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert {"key", "route", "stable"} <= set(spec["components"]["schemas"]["Flag"]["properties"])
    assert "key" not in spec["components"]["schemas"]["FlagInput"]["required"]
