"""`gateway serve --workers N`: N worker processes sharing both ports through SO_REUSEPORT.

Each worker is a whole replica (snapshot, controller, guard, mirror) on the shared Redis store;
the kernel spreads connections over the workers' sockets. Metrics use prometheus-client's
multiprocess mode: every worker writes its values to files in one directory, and `/metrics`
on any worker sums counters and histograms and takes the max (or min) of gauges across them.
The supervisor only starts, watches and stops the workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess

from gateway.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _worker_main(settings_json: str, pair_log: str | None) -> None:
    # A fresh interpreter (spawn): prometheus-client sees PROMETHEUS_MULTIPROC_DIR on import.
    from gateway.app import create_app
    from gateway.control.pairlog import configure_pair_log
    from gateway.dataplane.server import run

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
    )
    configure_pair_log(pair_log)
    settings = Settings.model_validate_json(settings_json)
    run(create_app(settings), reuse_port=True)


def supervise(settings: Settings) -> int:
    """Run `settings.workers` workers until SIGTERM/SIGINT; exit code 0 on a clean stop."""
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    context = multiprocessing.get_context("spawn")
    payload = settings.model_dump_json()
    workers: list[BaseProcess] = []
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for _ in range(settings.workers):
            worker = context.Process(
                target=_worker_main, args=(payload, settings.shadow.pair_log), daemon=False
            )
            worker.start()
            workers.append(worker)
        while not stopping and all(w.is_alive() for w in workers):
            time.sleep(0.2)
        if not stopping:
            log.error("a worker exited unexpectedly; stopping the others")
            stop(signal.SIGTERM, None)
        for process in workers:
            process.join(timeout=settings.shutdown_grace_s + 10)
        failed = [w.exitcode for w in workers if w.exitcode not in (0, -signal.SIGTERM)]
        return 1 if failed else 0
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        sys.stdout.flush()
