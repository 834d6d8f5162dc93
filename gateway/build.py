"""What this gateway is: its version and the HTTP server and upstream client it runs with, as
the start-up line and `gateway_build_info{version,server,client}` report them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from gateway.settings import Settings

DISTRIBUTION = "canary-gateway"


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def server_choice(settings: Settings) -> str:
    """The data plane's HTTP server: `server.http`, or `stock` where that fell back to it
    (gateway/dataplane/servers.py)."""
    from gateway.dataplane.servers import choose

    return choose(settings.server.http).name


def client_choice(settings: Settings) -> str:
    return settings.upstream.client
