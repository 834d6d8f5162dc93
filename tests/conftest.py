"""Shared fixtures: a real Redis, real servers on free loopback ports, a real uvicorn.

Redis: `REDIS_URL` when set; otherwise pytest-redis starts a private redis-server (no
persistence) in a temp dir for the session. `restartable_redis` is a separate one per test
that a fault test may stop and start. No redis-server binary means a clear failure, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from pytest_redis import factories

GATEWAY_BIN = Path(sys.executable).with_name("gateway")
# Gateways built in this process (and their children) keep their state files in a temp dir,
# never in the user's ~/.local/state.
os.environ.setdefault("XDG_STATE_HOME", tempfile.mkdtemp(prefix="gateway-test-state-"))
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

# --- the data-plane suites run on every HTTP server the data port offers ---------------------

# `server.http` values; `make test` runs these modules once per kind. The version runs
# (.ci/versions) choose `fast` alone through GATEWAY_TEST_SERVER_KINDS: uvicorn is bounded to one
# minor, so the stock server differs there only by uvicorn's patch release, while `fast` is what
# reaches into the libraries whose versions move.
# granian 2.8 was tried and left out: its parser accepts what the hostile-HTTP suite refuses
# (docs/fast-path.md).
ALL_SERVER_KINDS = ("fast", "stock")
SERVER_KINDS = tuple(
    kind.strip()
    for kind in os.environ.get("GATEWAY_TEST_SERVER_KINDS", ",".join(ALL_SERVER_KINDS)).split(",")
)
if not SERVER_KINDS or not set(SERVER_KINDS) <= set(ALL_SERVER_KINDS):
    raise pytest.UsageError(
        f"GATEWAY_TEST_SERVER_KINDS={os.environ.get('GATEWAY_TEST_SERVER_KINDS')!r}: "
        f"a comma-separated choice of {', '.join(ALL_SERVER_KINDS)}"
    )
DATAPLANE_SUITES = frozenset(
    {
        "test_dataplane",
        "test_faults",
        "test_hostile_clients",
        "test_hostile_http",
        "test_shutdown",
        "test_upstream_wire",
    }
)
SERVER_ENV = "GATEWAY_SERVER__HTTP"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if module in DATAPLANE_SUITES and "server_kind" in metafunc.fixturenames:
        metafunc.parametrize("server_kind", SERVER_KINDS, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def server_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """The data port's server (`server.http`) for this module's tests: each of
    `SERVER_KINDS` in the data-plane suites, `fast` elsewhere. Set in the environment, so that
    every `gateway serve` a test starts, and every in-process `load_settings`, uses it."""
    kind: str = getattr(request, "param", "fast")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SERVER_ENV, kind)
        yield kind


# --- real processes on free ports ------------------------------------------------------------


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    # The kernel picks a free port; it stays free long enough for the child to bind it. Two
    # ports chosen before either is bound (a gateway's data and admin ports) can be the same
    # one, so a port handed out before is never handed out again.
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass(frozen=True, slots=True)
class Server:
    process: subprocess.Popen[bytes]
    port: int
    output: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.output.read_text(errors="replace")


@contextlib.contextmanager
def running(
    argv: Callable[[int], Sequence[str]],
    *,
    ready: Callable[[int], str] = lambda port: f"http://127.0.0.1:{port}/",
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 15.0,
) -> Iterator[Server]:
    """Start `argv(port)`, wait until `ready(port)` answers HTTP, stop it at exit."""
    port = port or free_port()
    with tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False) as out:
        output = Path(out.name)
    with output.open("wb") as sink:
        process = subprocess.Popen(
            list(argv(port)),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        server = Server(process, port, output)
        try:
            _wait_ready(process, ready(port), output, timeout_s)
            yield server
        finally:
            stop(process)
            output.unlink(missing_ok=True)


def _wait_ready(
    process: subprocess.Popen[bytes], url: str, output: Path, deadline_s: float
) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(httpx.TransportError):
            httpx.get(url, timeout=1.0)
            return
        time.sleep(0.05)
    pytest.fail(
        f"{process.args} did not answer on {url} (exit {process.poll()}):\n{output.read_text()}"
    )


def stop(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int:
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Server]]:
    """`spawn(argv_of_port, **kw)` starts a server that is stopped when the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda argv, **kw: stack.enter_context(running(argv, **kw))


@pytest.fixture
def model_server(spawn: Callable[..., Server]) -> Callable[..., Server]:
    """`model_server("v1", error_rate=0.5, ...)`: a real `gateway model-server`."""

    def start(name: str, **options: Any) -> Server:
        extra = []
        for key, value in options.items():
            extra += [f"--{key.replace('_', '-')}", str(value)]
        return spawn(
            lambda port: [
                str(GATEWAY_BIN),
                "model-server",
                "--port",
                str(port),
                "--name",
                name,
                *extra,
            ],
            # A test hook: never delayed or failed, whatever --latency-ms or --error-rate say.
            ready=lambda port: f"http://127.0.0.1:{port}/_bytes/0",
        )

    return start


@dataclass(frozen=True, slots=True)
class GatewayProcess:
    server: Server
    admin_port: int

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@pytest.fixture
def gateway_server(spawn: Callable[..., Server], tmp_path: Path) -> Callable[..., GatewayProcess]:
    """`gateway_server(flags_doc, settings={...}, args=[...], env={...})`: `gateway serve`."""
    counter = iter(range(1000))

    def start(
        flags: dict[str, Any] | None = None,
        *,
        settings: dict[str, Any] | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        port: int | None = None,
        admin_port: int | None = None,
    ) -> GatewayProcess:
        n = next(counter)
        argv_extra = list(args)
        if flags is not None:
            flags_file = tmp_path / f"flags-{n}.yaml"
            flags_file.write_text(yaml.safe_dump(flags))
            argv_extra += ["--flags", str(flags_file)]
        settings = dict(settings or {})
        if flags is None:  # no flags file at all (not even config/flags.yaml from the cwd)
            settings["store"] = {**settings.get("store", {}), "flags_file": None}
        # Each gateway its own snapshot file, unless the test names one (to share across runs).
        store = settings["store"] = dict(settings.get("store", {}))
        store.setdefault("snapshot_file", str(tmp_path / f"snapshot-{n}.json"))
        settings_file = tmp_path / f"gateway-{n}.yaml"
        settings_file.write_text(yaml.safe_dump(settings))
        admin = admin_port or free_port()
        server = spawn(
            lambda p: [
                str(GATEWAY_BIN),
                "serve",
                "--config",
                str(settings_file),
                "--host",
                "127.0.0.1",
                "--port",
                str(p),
                "--admin-port",
                str(admin),
                *argv_extra,
            ],
            ready=lambda _p: f"http://127.0.0.1:{admin}/readyz",
            env=env,
            port=port,
        )
        return GatewayProcess(server, admin)

    return start


def raw_http(port: int, request: bytes, *, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client normalises them) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            data = b"".join(chunks)
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
    data = b"".join(chunks)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.partition(b"\r\n\r\n")[2]


def flag_doc(
    stable: str,
    canary: str | None,
    *,
    weight: float = 0.1,
    key: str = "sentiment",
    prefix: str = "/v1/sentiment",
    hold: str = "1h",
    on_missing: str = "stable",
    **fields: Any,
) -> dict[str, Any]:
    """A flags document with one flag; the canary holds `weight` for `hold`."""
    flag: dict[str, Any] = {
        "key": key,
        "route": {"path_prefix": prefix},
        "unit": {"from": "header", "name": "x-user-id", "on_missing": on_missing},
        "stable": {"name": "v1", "upstream": stable},
        **fields,
    }
    if canary is not None:
        flag["canary"] = {"name": "v2", "upstream": canary}
        flag.setdefault("schedule", {"kind": "step", "steps": [{"weight": weight, "hold": hold}]})
    return {"flags": [flag]}


# --- a real uvicorn serving an ASGI app in this process ----------------------------------------


@dataclass(slots=True)
class UvicornHandle:
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def serve_asgi(app: Any, *, lifespan: str = "auto", **options: Any) -> Iterator[UvicornHandle]:
    """`options` go to uvicorn.Config as they are (`http=`, `loop=`, ...)."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan=lifespan,
        log_level="warning",
        access_log=False,
        **options,
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"uvicorn did not start on port {port}")
        time.sleep(0.02)
    try:
        yield UvicornHandle(server, thread, port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def uvicorn_app() -> Iterator[Callable[..., UvicornHandle]]:
    """`uvicorn_app(asgi_app)` serves it on a free port with a real uvicorn until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda app, **kw: stack.enter_context(serve_asgi(app, **kw))


# --- Redis -------------------------------------------------------------------------------------


def _require_redis_server() -> None:
    if not Path(REDIS_SERVER).exists():
        pytest.fail(
            "redis-server not found: install it (Debian: apt-get install redis-server) "
            "or set REDIS_URL to a Redis the tests may flush",
            pytrace=False,
        )


redis_session_proc = factories.redis_proc(executable=REDIS_SERVER, port=None)
redis_private_proc = factories.redis_proc(executable=REDIS_SERVER, port=None)


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """A Redis for the whole session: REDIS_URL, or a private redis-server."""
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    _require_redis_server()
    proc = request.getfixturevalue("redis_session_proc")
    return f"redis://{proc.host}:{proc.port}/0"


@dataclass(slots=True)
class RestartableRedis:
    """A private redis-server a fault test may stop and start again on the same port."""

    executor: Any

    @property
    def url(self) -> str:
        return f"redis://{self.executor.host}:{self.executor.port}/0"

    def stop(self) -> None:
        self.executor.stop()

    def start(self) -> None:
        self.executor.start()


@pytest.fixture
def restartable_redis(request: pytest.FixtureRequest) -> Iterator[RestartableRedis]:
    _require_redis_server()
    executor = request.getfixturevalue("redis_private_proc")
    handle = RestartableRedis(executor)
    yield handle
    if not executor.running():
        executor.start()
    # Flushed so the next test that shares this server starts empty.
    import redis

    redis.Redis(host=executor.host, port=executor.port).flushall()


@pytest.fixture
def scratch_redis_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of the test's own, so tests sharing one Redis never see each other's keys."""
    return f"gwtest-{abs(hash(request.node.nodeid)) % 10**8}-{os.getpid()}"


# --- Redis Sentinel and Redis Cluster (tests/redis_topologies.py) --------------------------------


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[Any]:
    """1 master, 1 replica, 3 sentinels, for the whole session (never failed over)."""
    _require_redis_server()
    import redis_topologies

    with redis_topologies.sentinel(free_port) as deployment:
        yield deployment


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """3 masters with a replica each, for the whole session (never failed over)."""
    _require_redis_server()
    import redis_topologies

    with redis_topologies.cluster(free_port) as deployment:
        yield deployment
