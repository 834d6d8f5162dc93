"""The seam in front of the direct aiohttp client (gateway/dataplane/upstream/choice.py): which
client runs for each `upstream.client`, and the fallback to the httptools client (public APIs
only), with one warning, when the direct one is not for this aiohttp or does not load."""

from __future__ import annotations

import logging

import pytest

from gateway.dataplane.upstream.choice import (
    TESTED_AIOHTTP,
    ClientFactory,
    choose_client,
    within,
)
from gateway.dataplane.upstream.httptools_client import HttptoolsClient

LOGGER = "gateway.dataplane.upstream.choice"
TESTED = ".".join(map(str, TESTED_AIOHTTP[0])) + ".2"


@pytest.mark.parametrize(
    ("release", "inside"),
    [
        ("3.14.0", True),
        ("3.14.5", True),
        ("3.14.0rc1", True),
        ("3.13.9", False),
        ("3.15.0", False),
        ("3.15.0a1", False),
        ("4.0.0", False),
        ("not installed", False),
        ("", False),
    ],
)
def test_a_release_is_within_by_major_and_minor(release: str, inside: bool) -> None:
    assert within(release, (3, 14), (3, 15)) is inside


def test_the_installed_aiohttp_loads_the_direct_client(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        choice = choose_client("aiohttp-direct")
    assert choice.impl == "aiohttp-direct"
    assert choice.make.__module__ == "gateway.dataplane.fast.aiohttp_client"
    assert caplog.records == []


@pytest.mark.parametrize("kind", ["httptools", "aiohttp", "httpx"])
def test_the_stock_clients_are_what_they_say_and_never_load_the_direct_one(kind: str) -> None:
    def refuse() -> ClientFactory:
        raise AssertionError("the direct client was loaded for a stock choice")

    choice = choose_client(kind, aiohttp_version="0.0", load_direct=refuse)  # type: ignore[arg-type]
    assert choice.impl == kind


@pytest.mark.parametrize("release", ["3.13.3", "3.15.0", "4.0.0a0"])
def test_an_untested_aiohttp_gets_the_httptools_client_and_one_warning(
    release: str, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse() -> ClientFactory:
        raise AssertionError("the direct client was loaded outside the tested range")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        choice = choose_client("aiohttp-direct", aiohttp_version=release, load_direct=refuse)
    assert (choice.impl, choice.make) == ("httptools", HttptoolsClient)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert release in record.getMessage() and "httptools client" in record.getMessage()


@pytest.mark.parametrize(
    "failure", [ImportError("cannot import name 'ResponseHandler'"), TypeError("bad base")]
)
def test_a_direct_client_that_fails_to_load_gets_the_httptools_client_and_one_warning(
    failure: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> ClientFactory:
        raise failure

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        choice = choose_client("aiohttp-direct", aiohttp_version=TESTED, load_direct=broken)
    assert (choice.impl, choice.make) == ("httptools", HttptoolsClient)
    [record] = caplog.records
    assert str(failure) in record.getMessage()
