"""Which upstream client runs for HTTP/1.1 upstreams: the seam in front of the direct client.

`upstream.client: aiohttp-direct` asks for the direct aiohttp client (the default is
`httptools`), the only upstream module that reaches into aiohttp's internals
(gateway/dataplane/fast/aiohttp_client.py). It is imported here, lazily, and only when it is
chosen and the installed aiohttp is a release it was tested with (`TESTED_AIOHTTP`, the bounds
pyproject.toml sets).
Otherwise, or if its import fails, the httptools client (`upstream/httptools_client.py`),
which uses only asyncio's and httptools' public APIs, runs in its place: one warning is
logged, and the choice says so (`ClientChoice.impl`, exported as
`gateway_fast_path{part="client",impl=...}`).

`httptools`, `aiohttp` (aiohttp's `ClientSession`) and `httpx` use public APIs only; they are
never replaced.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

from gateway.dataplane.upstream.aiohttp_client import AiohttpClient
from gateway.dataplane.upstream.base import UpstreamClient
from gateway.dataplane.upstream.httptools_client import HttptoolsClient
from gateway.dataplane.upstream.httpx_client import HttpxClient
from gateway.settings import ClientKind

log = logging.getLogger(__name__)

# The aiohttp releases the direct client was tested with: from the first up to, not including,
# the second (major, minor). pyproject.toml's bounds on aiohttp say the same
# (tests/deploy/test_seam_pins.py holds them equal).
TESTED_AIOHTTP = ((3, 14), (3, 15))
DIRECT_MODULE = "gateway.dataplane.fast.aiohttp_client"


class ClientFactory(Protocol):
    def __call__(
        self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int
    ) -> UpstreamClient: ...


@dataclass(frozen=True, slots=True)
class ClientChoice:
    """The client that runs: `impl` names it (a stock one where the direct one could not
    load), `make` builds it."""

    impl: ClientKind
    make: ClientFactory


def choose_client(
    kind: ClientKind,
    *,
    aiohttp_version: str | None = None,
    load_direct: Callable[[], ClientFactory] | None = None,
) -> ClientChoice:
    """The client for `kind`. The direct client is imported only here, and only for
    `aiohttp-direct` on a tested aiohttp (`aiohttp_version`, else the installed one);
    `load_direct` imports it (the default imports DIRECT_MODULE)."""
    if kind == "httpx":
        return ClientChoice("httpx", functools.partial(HttpxClient, http2=False))
    if kind == "aiohttp":
        return ClientChoice("aiohttp", AiohttpClient)
    if kind == "httptools":
        return ClientChoice("httptools", HttptoolsClient)
    found = aiohttp_version if aiohttp_version is not None else _installed("aiohttp")
    if not within(found, *TESTED_AIOHTTP):
        low, high = (".".join(map(str, bound)) for bound in TESTED_AIOHTTP)
        return _stock(f"aiohttp {found} is outside the tested range >={low},<{high}")
    try:
        make = (load_direct or _import_direct)()
    except Exception as exc:  # any failure to load it leaves the stock client, never none
        return _stock(f"its module did not load: {exc.__class__.__name__}: {exc}")
    return ClientChoice("aiohttp-direct", make)


def within(release: str, low: tuple[int, int], high: tuple[int, int]) -> bool:
    """Whether `release` (3.14.5, 3.15.0a1) is at least `low` and below `high`, by
    (major, minor); a release that does not start with two numbers is not."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None:
        return False
    found = (int(match[1]), int(match[2]))
    return low <= found < high


def _stock(reason: str) -> ClientChoice:
    log.warning(
        "upstream.client: aiohttp-direct is not used (%s); the httptools client runs instead",
        reason,
    )
    return ClientChoice("httptools", HttptoolsClient)


def _import_direct() -> ClientFactory:
    module = importlib.import_module(DIRECT_MODULE)
    factory: ClientFactory = module.DirectAiohttpClient
    return factory


def _installed(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"
