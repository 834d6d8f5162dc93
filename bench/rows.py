"""The rows of the bench, as declarative entries: a name, what it is, how to start it.

A launcher gets a `Spot` (its port, the upstreams' URLs, a Redis URL when the row asked for
one, a private directory for config files) and returns the command line; the runner starts it,
waits for it and stops it. `launch=None` means wrk talks to the upstream itself. To add a row,
append an entry here: `gateway_serve(workers=2, features=True)`,
`gateway_serve(settings={"upstream": {"client": "httpx"}})`, ...
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.settings import Upstream

BENCH = Path(__file__).resolve().parent
PYTHON = Path(sys.executable)
GATEWAY = PYTHON.with_name("gateway")
NGINX = Path("/usr/sbin/nginx")
REDIS = Path("/usr/bin/redis-server")
# Rows with `users=True` send `x-user-id: user-<n>` for n in 1..USERS, round robin (wrk through
# bench/users.lua, the light load through lightload.py), so a canary gets its share of units.
USERS = 1000
USERS_SCRIPT = BENCH / "users.lua"


@dataclass(frozen=True, slots=True)
class Spot:
    port: int
    upstream: str  # http://127.0.0.1:PORT, or "" when starting the upstream itself
    workdir: Path
    canary: str = ""  # a second upstream, same kind, for rows with a canary
    shadow: str = ""  # a third one, for rows with a shadow
    redis: str = ""  # redis://127.0.0.1:PORT/0 of the row's private Redis (`Row.redis`)


Launcher = Callable[[Spot], list[str]]


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    what: str
    launch: Launcher | None
    needs: Callable[[], str | None] = lambda: None  # why the row cannot run here, or None
    users: bool = False  # requests carry x-user-id (see USERS), so units split by weight
    redis: bool = False  # a private redis-server is started for the row, stopped after it
    workers: int = 1  # listening sockets to wait for before the warm-up (SO_REUSEPORT)
    upstreams: tuple[str, ...] = ()  # extra upstreams the row forwards to: canary, shadow


def _nginx_missing() -> str | None:
    return None if NGINX.exists() else f"{NGINX} not found (apt-get install nginx)"


def _redis_missing() -> str | None:
    return None if REDIS.exists() else f"{REDIS} not found (apt-get install redis-server)"


# --- nginx -----------------------------------------------------------------------------------


def _nginx_conf(workdir: Path, server: str) -> str:
    # Every path nginx would write to by default is under /var: keep them in the temp dir.
    temp = " ".join(f"{kind}_temp_path {workdir / kind};" for kind in _NGINX_TEMPS)
    return f"""worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 1000000;
    {server}
}}
"""


_NGINX_TEMPS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def _nginx(workdir: Path, server: str) -> list[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(_nginx_conf(workdir, server))
    return [
        str(NGINX),
        "-p",
        str(workdir),
        "-e",
        str(workdir / "error.log"),
        "-c",
        str(conf),
        "-g",
        "daemon off;",
    ]


def nginx_static(spot: Spot) -> list[str]:
    server = f"""server {{
        listen 127.0.0.1:{spot.port};
        default_type application/json;
        location / {{ return 200 '{{"ok":true}}'; }}
    }}"""
    return _nginx(spot.workdir / f"nginx-upstream-{spot.port}", server)


def nginx_proxy(spot: Spot) -> list[str]:
    upstream = spot.upstream.removeprefix("http://")
    server = f"""upstream backend {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{spot.port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    return _nginx(spot.workdir / "nginx-proxy", server)


# --- Python processes ------------------------------------------------------------------------


def python_proxy(script: str) -> Launcher:
    def launch(spot: Spot) -> list[str]:
        return [
            str(PYTHON),
            str(BENCH / script),
            "--upstream",
            spot.upstream,
            "--port",
            str(spot.port),
        ]

    return launch


def model_server(spot: Spot) -> list[str]:
    return [str(GATEWAY), "model-server", "--port", str(spot.port), "--name", "upstream"]


def redis_server(spot: Spot) -> list[str]:
    """A private, memory-only Redis for the rows that need the shared store (workers > 1)."""
    return [
        str(REDIS),
        "--port",
        str(spot.port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(spot.workdir),
    ]


def bench_flag(spot: Spot, *, features: bool, shadow_sample: float = 0.1) -> dict[str, Any]:
    """The one flag of a gateway row: stable only, or every feature on the request path.

    With `features`: a canary at weight 0.5 (one step held for a day, so it neither advances
    nor promotes during the bench), the default guard (SPRT on canary errors), metrics as
    always, and a shadow on a third upstream sampling `shadow_sample` of requests (10 %).
    Units come from the default `x-user-id` header, which the row's load sends
    (`Row(users=True)`).
    """
    flag: dict[str, Any] = {"key": "bench", "route": {"path_prefix": "/"}}
    flag["stable"] = {"name": "v1", "upstream": spot.upstream}
    if features:
        flag["canary"] = {"name": "v2", "upstream": spot.canary}
        flag["schedule"] = {"kind": "step", "steps": [{"weight": 0.5, "hold": "24h"}]}
        flag["shadows"] = [
            {"name": "v3", "upstream": spot.shadow, "sample": shadow_sample, "metric": "latency_ms"}
        ]
    return flag


def gateway_serve(
    *,
    workers: int | None = None,
    settings: Mapping[str, Any] | None = None,
    features: bool = False,
    shadow_sample: float = 0.1,
) -> Launcher:
    """`gateway serve` with one flag routing everything to the upstream (see `bench_flag`).

    A row with `redis=True` gets `--redis-url` (the flags file then seeds the Redis store).
    """

    def launch(spot: Spot) -> list[str]:
        from processes import free_port  # only a gateway row needs a second port

        workdir = spot.workdir / f"gateway-{spot.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        flags = workdir / "flags.json"  # JSON is YAML: the flags loader reads either
        flag = bench_flag(spot, features=features, shadow_sample=shadow_sample)
        flags.write_text(json.dumps({"flags": [flag]}, indent=2))
        argv = [str(GATEWAY), "serve", "--flags", str(flags)]
        argv += ["--port", str(spot.port), "--admin-port", str(free_port())]
        if workers is not None:
            argv += ["--workers", str(workers)]
        if spot.redis:
            argv += ["--redis-url", spot.redis]
        # Always a settings file, so the developer's config/gateway.yaml never leaks in.
        config = workdir / "gateway.json"
        config.write_text(json.dumps(_loopback(settings or {}), indent=2))
        return [*argv, "--config", str(config)]

    return launch


def _loopback(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` with both listeners on 127.0.0.1: the admin API has no tokens here."""
    merged: dict[str, Any] = {"listen": {"host": "127.0.0.1"}, "admin": {"host": "127.0.0.1"}}
    for key, value in settings.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, Mapping) else value
    return merged


# --- the tables ------------------------------------------------------------------------------

_ALL = "gateway, canary 0.5 + guard + metrics + 10 % shadow"
# Every `upstream.client`, each with every feature on: `gateway-all-<client>`.
CLIENTS = ("aiohttp-direct", "httptools", "aiohttp", "httpx")
DEFAULT_CLIENT = Upstream().client  # what `gateway-all` and `gateway-all-stock` run
_EXTRA = ("canary", "shadow")

ROWS: tuple[Row, ...] = (
    Row("direct", "wrk straight to the upstream", launch=None),
    Row("naive", "Starlette + httpx proxy (bench/naive_proxy.py)", python_proxy("naive_proxy.py")),
    Row("bare", "raw ASGI + aiohttp proxy (bench/bare_proxy.py)", python_proxy("bare_proxy.py")),
    Row(
        "forwarder",
        "uvloop byte forwarder, no HTTP: the floor under a Python proxy (bench/forwarder.py)",
        python_proxy("forwarder.py"),
    ),
    Row("nginx", "nginx reverse proxy, keepalive upstream", nginx_proxy, _nginx_missing),
    Row("gateway", "gateway serve, one flag, stable only", gateway_serve()),
    Row(
        "gateway-all",
        _ALL,
        gateway_serve(features=True),
        users=True,
        upstreams=_EXTRA,
    ),
    *(
        Row(
            f"gateway-all-{client}",
            f"{_ALL}, upstream.client: {client}",
            gateway_serve(features=True, settings={"upstream": {"client": client}}),
            users=True,
            upstreams=_EXTRA,
        )
        for client in CLIENTS
    ),
    Row(
        "gateway-all-stock",
        _ALL + ", server.http: stock",
        gateway_serve(features=True, settings={"server": {"http": "stock"}}),
        users=True,
        upstreams=_EXTRA,
    ),
    *(  # the rest of the server x client matrix; gateway-all-stock is the whole stock fallback
        Row(
            f"gateway-all-stock-{client}",
            f"{_ALL}, server.http: stock, upstream.client: {client}",
            gateway_serve(
                features=True,
                settings={"server": {"http": "stock"}, "upstream": {"client": client}},
            ),
            users=True,
            upstreams=_EXTRA,
        )
        for client in CLIENTS
        if client != DEFAULT_CLIENT  # that is gateway-all-stock
    ),
    Row(
        "gateway-all-redis",
        _ALL + ", Redis store",
        gateway_serve(features=True),
        _redis_missing,
        users=True,
        redis=True,
        upstreams=_EXTRA,
    ),
    Row(
        "gateway-all-2w",
        _ALL + ", Redis store, --workers 2",
        gateway_serve(workers=2, features=True),
        _redis_missing,
        users=True,
        redis=True,
        workers=2,
        upstreams=_EXTRA,
    ),
    Row(
        "gateway-httpx",
        "gateway, one flag, upstream.client: httpx",
        gateway_serve(settings={"upstream": {"client": "httpx"}}),
    ),
)

# In order of preference: a Python upstream on 2 cores is itself a bottleneck.
UPSTREAMS: tuple[Row, ...] = (
    Row("nginx", "nginx static: return 200 '{\"ok\":true}'", nginx_static, _nginx_missing),
    Row("model-server", "gateway model-server (GET echo)", model_server),
)
