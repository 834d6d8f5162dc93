"""The rows of the bench, as declarative entries: a name, what it is, how to start it.

A launcher gets a `Spot` (its port, the upstream's URL, a private directory for config files)
and returns the command line; the runner starts it, waits for it and stops it. `launch=None`
means wrk talks to the upstream itself. To add a row (gateway with every feature on, 2 workers,
the httpx upstream client), append an entry here: `gateway_serve(workers=2)`,
`gateway_serve(settings={"upstream": {"client": "httpx"}})`, ...
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PYTHON = Path(sys.executable)
GATEWAY = PYTHON.with_name("gateway")
NGINX = Path("/usr/sbin/nginx")


@dataclass(frozen=True, slots=True)
class Spot:
    port: int
    upstream: str  # http://127.0.0.1:PORT, or "" when starting the upstream itself
    workdir: Path


Launcher = Callable[[Spot], list[str]]


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    what: str
    launch: Launcher | None
    needs: Callable[[], str | None] = lambda: None  # why the row cannot run here, or None


def _nginx_missing() -> str | None:
    return None if NGINX.exists() else f"{NGINX} not found (apt-get install nginx)"


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
    return _nginx(spot.workdir / "nginx-upstream", server)


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


def gateway_serve(
    *, workers: int | None = None, settings: Mapping[str, Any] | None = None
) -> Launcher:
    """`gateway serve` with one flag routing everything to the upstream as stable, no canary."""

    def launch(spot: Spot) -> list[str]:
        from processes import free_port  # only a gateway row needs a second port

        workdir = spot.workdir / "gateway"
        workdir.mkdir(parents=True, exist_ok=True)
        flag = {"key": "bench", "route": {"path_prefix": "/"}}
        flag["stable"] = {"name": "upstream", "upstream": spot.upstream}
        flags = workdir / "flags.json"  # JSON is YAML: the flags loader reads either
        flags.write_text(json.dumps({"flags": [flag]}, indent=2))
        argv = [str(GATEWAY), "serve", "--flags", str(flags)]
        argv += ["--port", str(spot.port), "--admin-port", str(free_port())]
        if workers is not None:
            argv += ["--workers", str(workers)]
        if settings:
            config = workdir / "gateway.json"
            config.write_text(json.dumps(settings, indent=2))
            argv += ["--config", str(config)]
        return argv

    return launch


# --- the tables ------------------------------------------------------------------------------

ROWS: tuple[Row, ...] = (
    Row("direct", "wrk straight to the upstream", launch=None),
    Row("naive", "Starlette + httpx proxy (bench/naive_proxy.py)", python_proxy("naive_proxy.py")),
    Row("bare", "raw ASGI + aiohttp proxy (bench/bare_proxy.py)", python_proxy("bare_proxy.py")),
    Row("nginx", "nginx reverse proxy, keepalive upstream", nginx_proxy, _nginx_missing),
    Row("gateway", "gateway serve, one flag, stable only", gateway_serve()),
)

# In order of preference: a Python upstream on 2 cores is itself a bottleneck.
UPSTREAMS: tuple[Row, ...] = (
    Row("nginx", "nginx static: return 200 '{\"ok\":true}'", nginx_static, _nginx_missing),
    Row("model-server", "gateway model-server (GET echo)", model_server),
)
