"""`python -m gateway.healthcheck`: exit 0 when this host's gateway answers /healthz on the
configured admin port, 1 otherwise (the container image's HEALTHCHECK).

The port comes from the same settings `gateway serve` reads (GATEWAY_CONFIG, GATEWAY_* variables),
so moving the admin port moves the check with it. A wildcard admin address is probed on
loopback.
"""

from __future__ import annotations

import sys
import urllib.request

from gateway.errors import InvalidDocument
from gateway.settings import load_settings

TIMEOUT_S = 2.0
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def url() -> str:
    admin = load_settings().admin
    host = "127.0.0.1" if admin.host in WILDCARDS else admin.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{admin.port}/healthz"


def main() -> int:
    try:
        target = url()
    except InvalidDocument as exc:
        print(f"healthcheck: bad settings: {exc}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(target, timeout=TIMEOUT_S) as answer:
            return 0 if answer.status == 200 else 1
    except OSError as exc:  # refused, timed out, or a non-2xx answer (HTTPError)
        print(f"healthcheck: {target}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
