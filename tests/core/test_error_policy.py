"""Which outcomes the guard counts as canary errors (`guard.errors`, DESIGN 5 and 10)."""

from __future__ import annotations

import pytest

from gateway.control.guard import ErrorPolicy
from gateway.core.flags import Guard
from gateway.dataplane.sse import StreamWatch

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


STREAM_KINDS = ["status_5xx", "stream_aborted", "error_event", "ttft_over:500"]


def _stream(*events: bytes, left: bool = False, first_at: float | None = None) -> StreamWatch:
    watch = StreamWatch(started=0.0)
    for event in events:
        watch.feed(event, first_at if first_at is not None else 0.1)
    watch.finish()
    watch.client_left = left
    return watch


TOKEN = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
ERROR = b'data: {"error": {"message": "boom"}}\n\n'


def test_a_stream_its_client_left_is_not_a_cut_stream() -> None:
    """A stream without `[DONE]` is `stream_aborted`, unless its client went first."""
    policy = ErrorPolicy.of(Guard(errors=STREAM_KINDS))
    assert policy.kind_of(200, None, 1.0, _stream(TOKEN)) == "stream_aborted"
    left = _stream(TOKEN, left=True)
    assert policy.kind_of(200, None, 1.0, left) is None
    assert left.failure(expect_done=True) is None


def test_what_a_stream_showed_before_its_client_left_still_counts() -> None:
    policy = ErrorPolicy.of(Guard(errors=STREAM_KINDS))
    errored = _stream(TOKEN, ERROR, left=True)
    assert policy.kind_of(200, None, 1.0, errored) == "error_event"
    assert errored.failure(expect_done=True) == "error_event"
    late = _stream(TOKEN, left=True, first_at=0.9)  # first event 0.9 s after the request
    assert policy.kind_of(200, None, 1.0, late) == "ttft_over:500"
    nothing_yet = _stream(left=True)
    assert policy.kind_of(200, None, 0.4, nothing_yet) is None  # left before the limit
    assert policy.kind_of(200, None, 0.6, nothing_yet) == "ttft_over:500"  # left after it
