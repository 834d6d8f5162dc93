"""Which outcomes the guard counts as canary errors (`guard.errors`, DESIGN 5 and 10)."""

from __future__ import annotations

import pytest

from gateway.control.guard import ErrorPolicy
from gateway.core.flags import Guard

KIND_SETS = [["status_5xx"], ["timeout"], ["connect_error"], ["status_4xx"], ["latency_over:500"]]


@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda k: ",".join(k))
@pytest.mark.parametrize("status", [200, 206, 404])
def test_an_answer_broken_off_mid_body_is_an_error_whatever_the_flag_counts(
    kinds: list[str], status: int
) -> None:
    policy = ErrorPolicy.of(Guard(errors=kinds))
    assert policy.is_error(status, "mid_body", 0.001)
    assert not policy.is_error(200, None, 0.001)  # the same answer, whole, is not


def test_a_garbled_answer_counts_as_the_502_it_was_given() -> None:
    assert ErrorPolicy.of(Guard(errors=["status_5xx"])).is_error(502, "bad_response", 0.001)
    assert not ErrorPolicy.of(Guard(errors=["timeout"])).is_error(502, "bad_response", 0.001)
