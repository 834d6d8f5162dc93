"""Real Redis Sentinel and Redis Cluster deployments for the tests, from the installed
`redis-server` (which runs as a sentinel with `--sentinel`; Debian's redis-server package is
enough) and `redis-cli --cluster create` (Debian: redis-tools), on free loopback ports in a
temp dir, without persistence.

- `Sentinel`: 1 master, 1 replica, 3 sentinels (quorum 2) watching service `gwmaster`; the
  servers run with `min-replicas-to-write 1`, as the Redis store's docstring advises.
- `Cluster`: 3 masters with one replica each, so that a killed master's replica takes over.

Each exposes `url` (what the gateway is given), `client()` (a redis-py client that follows the
current master, for checks) and a way to fail over. Processes are killed when closed.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel as SentinelClient

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
SERVICE = "gwmaster"


def _wait(check: Callable[[], Any], what: str, within_s: float = 30.0) -> Any:
    deadline = time.monotonic() + within_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


class _Processes:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="redis-topology-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, port: int, *args: str) -> subprocess.Popen[bytes]:
        workdir = self.dir / str(port)
        workdir.mkdir(exist_ok=True)
        log = (workdir / "log").open("wb")
        proc = subprocess.Popen(
            [REDIS_SERVER, *args], cwd=workdir, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[port] = proc
        return proc

    def alive(self, port: int) -> bool:
        """True while the process runs; its log in the error when it exited."""
        code = self.procs[port].poll()
        if code is not None:
            log = (self.dir / str(port) / "log").read_text(errors="replace")
            raise AssertionError(f"redis-server on port {port} exited ({code}):\n{log}")
        return True

    def signal(self, port: int, sig: int) -> None:
        self.procs[port].send_signal(sig)

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def _started(
    setup: Callable[[_Processes, Callable[[], int]], None], ports: Callable[[], int]
) -> _Processes:
    """Run `setup` on fresh processes; again on new ports when a port found free was taken
    before redis-server bound it (another process's connection can take it meanwhile)."""
    for attempt in range(3):
        processes = _Processes()
        try:
            setup(processes, ports)
            return processes
        except AssertionError as exc:
            processes.close()
            if "Address already in use" not in str(exc) or attempt == 2:
                raise
        except BaseException:
            processes.close()
            raise
    raise AssertionError("unreachable")


def _ping(port: int) -> bool:
    with redis.Redis(host="127.0.0.1", port=port) as client:
        return bool(client.ping())


def _server_args(port: int) -> list[str]:
    return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


class Sentinel:
    def __init__(self, ports: Callable[[], int]) -> None:
        self._p = _started(self._setup, ports)

    def _setup(self, processes: _Processes, ports: Callable[[], int]) -> None:
        self._p = processes
        self.master_port, self.replica_port = ports(), ports()
        self.sentinel_ports = [ports() for _ in range(3)]
        # A master without a replica refuses writes: a demoted master cannot acknowledge a
        # write that the failover then drops (both, as either may be the master).
        safe = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"]
        self._p.start(self.master_port, *_server_args(self.master_port), *safe)
        replica = [*_server_args(self.replica_port), *safe, "--replicaof", "127.0.0.1",
                   str(self.master_port)]  # fmt: skip
        self._p.start(self.replica_port, *replica)
        for port in self.sentinel_ports:
            conf = self._p.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self._p.start(port, str(conf), "--sentinel")
        self._sentinel = SentinelClient([("127.0.0.1", p) for p in self.sentinel_ports])

        def settled() -> bool:
            for port in self.sentinel_ports:
                s = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
                info = s.sentinel_master(SERVICE)
                s.close()
                if int(info["num-slaves"]) < 1 or int(info["num-other-sentinels"]) < 2:
                    return False
            link = redis.Redis(host="127.0.0.1", port=self.replica_port, decode_responses=True)
            up = link.info("replication")["master_link_status"] == "up"
            link.close()
            return bool(up)

        _wait(settled, "the sentinels to see the replica and each other")

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def master(self) -> tuple[str, int]:
        host, port = self._sentinel.discover_master(SERVICE)
        return str(host), int(port)

    def client(self) -> redis.Redis:
        host, port = self.master()
        return redis.Redis(host=host, port=port, decode_responses=True)

    def failover(self) -> tuple[int, int]:
        """SENTINEL FAILOVER; returns (old master port, new master port) once every sentinel
        names the new master and it accepts writes."""
        old = self.master()[1]
        s = redis.Redis(host="127.0.0.1", port=self.sentinel_ports[0], decode_responses=True)
        s.execute_command("SENTINEL", "FAILOVER", SERVICE)
        s.close()

        def moved() -> int | None:
            ports = set()
            for port in self.sentinel_ports:
                c = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
                ports.add(int(c.sentinel_get_master_addr_by_name(SERVICE)[1]))
                c.close()
            if len(ports) != 1 or old in ports:
                return None
            new = ports.pop()
            c = redis.Redis(host="127.0.0.1", port=new, decode_responses=True)
            role = c.info("replication")["role"]
            c.close()
            return new if role == "master" else None

        return old, int(_wait(moved, "the failover"))

    def freeze_master(self, seconds: float) -> int:
        """SIGSTOP the current master for `seconds`, then SIGCONT; returns its port."""
        port = self.master()[1]
        self._p.signal(port, signal.SIGSTOP)
        time.sleep(seconds)
        self._p.signal(port, signal.SIGCONT)
        return port

    def close(self) -> None:
        self._sentinel = None  # type: ignore[assignment]
        self._p.close()


class Cluster:
    def __init__(self, ports: Callable[[], int]) -> None:
        self._p = _started(self._setup, ports)

    def _setup(self, processes: _Processes, ports: Callable[[], int]) -> None:
        self._p = processes
        self.ports = [ports() for _ in range(6)]
        for port in self.ports:
            # The bus port on a free port of its own (port + 10000 may be taken or too high).
            args = [*_server_args(port), "--cluster-enabled", "yes", "--cluster-config-file",
                    "nodes.conf", "--cluster-node-timeout", "2000",
                    "--cluster-port", str(ports()),
                    "--cluster-replica-validity-factor", "0"]  # fmt: skip
            self._p.start(port, *args)
        for port in self.ports:
            _wait(lambda port=port: self._p.alive(port) and _ping(port), f"node {port}")
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        created = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *nodes, "--cluster-replicas", "1",
             "--cluster-yes"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr

        def ok() -> bool:
            for port in self.ports:
                c = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
                info, replication = c.cluster("info"), c.info("replication")
                slots = c.cluster("slots")
                c.close()
                if info["cluster_state"] != "ok" or len(slots) != 3:
                    return False
                if any(len(entry) < 4 for entry in slots):  # a master without its replica
                    return False
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
            return True

        _wait(ok, "the cluster to be ok")

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def client(self) -> RedisCluster:
        live = next(p for p in self.ports if p in self._p.procs)  # not a killed node
        return RedisCluster(host="127.0.0.1", port=live, decode_responses=True)

    def master_of(self, key: str) -> int:
        c = self.client()
        node = c.get_node_from_key(key)
        c.close()
        return int(node.port)

    def kill_master_of(self, key: str) -> tuple[int, int]:
        """SIGKILL the master holding `key`'s slot; returns (killed port, promoted port) once
        its replica took over and the cluster is ok again."""
        old = self.master_of(key)
        slot = redis.Redis(host="127.0.0.1", port=old).cluster("keyslot", key)
        self._p.kill(old)
        survivors = [p for p in self.ports if p != old and p in self._p.procs]

        def promoted() -> int | None:
            c = redis.Redis(host="127.0.0.1", port=survivors[0], decode_responses=True)
            try:
                if c.cluster("info")["cluster_state"] != "ok":
                    return None
                for start, end, master, *_ in c.cluster("slots"):
                    if start <= slot <= end and int(master[1]) != old:
                        return int(master[1])
                return None
            finally:
                c.close()

        return old, int(_wait(promoted, "a replica promoted", within_s=60))

    def freeze_master_of(self, key: str, seconds: float) -> int:
        """SIGSTOP the master holding `key` for `seconds`, then SIGCONT; returns its port."""
        port = self.master_of(key)
        self._p.signal(port, signal.SIGSTOP)
        time.sleep(seconds)
        self._p.signal(port, signal.SIGCONT)
        return port

    def close(self) -> None:
        self._p.close()


@contextlib.contextmanager
def sentinel(ports: Callable[[], int]) -> Iterator[Sentinel]:
    deployment = Sentinel(ports)
    try:
        yield deployment
    finally:
        deployment.close()


@contextlib.contextmanager
def cluster(ports: Callable[[], int]) -> Iterator[Cluster]:
    deployment = Cluster(ports)
    try:
        yield deployment
    finally:
        deployment.close()
