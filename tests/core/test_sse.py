"""Event streams watched on the way (gateway/dataplane/sse.py), request bodies read for routing
(gateway/dataplane/bodyroute.py), and the guard's stream kinds: pure, with property tests over how a
stream is cut into chunks."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.control.guard import ErrorPolicy
from gateway.core.flags import Guard
from gateway.dataplane.bodyroute import JsonBody, resolve
from gateway.dataplane.headers import is_event_stream
from gateway.dataplane.sse import StreamWatch, assemble, relay, stream_metric

WORDS = st.lists(st.sampled_from(["a", "b c", "error", "é", "\n", "[DONE]", '"x"']), max_size=12)


def openai_stream(tokens: list[str], *, done: bool = True, usage: bool = True) -> bytes:
    """An OpenAI chat stream as `model-server --openai` and vLLM write it."""
    head = {"id": "c1", "object": "chat.completion.chunk", "model": "m"}
    events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    events += [{**head, "choices": [{"index": 0, "delta": {"content": t}}]} for t in tokens]
    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        counts = {"prompt_tokens": 3, "completion_tokens": len(tokens), "total_tokens": 0}
        events.append({**head, "choices": [], "usage": counts})
    out = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def cut(body: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(body), *(p % (len(body) + 1) for p in points)})
    return [body[a:b] for a, b in itertools.pairwise(edges)]


def watched(chunks: list[bytes]) -> StreamWatch:
    watch = StreamWatch(0.0)
    for i, chunk in enumerate(chunks):
        watch.feed(chunk, float(i + 1))
    watch.finish()
    return watch


@given(WORDS, st.lists(st.integers(0, 10**6), max_size=30), st.booleans(), st.booleans())
def test_however_the_stream_is_cut_into_chunks_the_facts_are_the_same(
    tokens: list[str], points: list[int], done: bool, crlf: bool
) -> None:
    body = openai_stream(tokens, done=done)
    if crlf:
        body = body.replace(b"\n", b"\r\n")  # JSON escapes the tokens' own newlines
    chunks = cut(body, points)
    watch = watched(chunks)
    assert watch.events == len(tokens) + 3 + done
    assert watch.done is done and watch.error_event is False
    assert watch.completion_tokens == len(tokens)
    assert watch.failure(expect_done=True) == (None if done else "stream_aborted")
    assert watch.failure(expect_done=False) is None
    # One gap per arrival that completed an event after the first such arrival.
    arrivals = [i + 1 for i, _ in enumerate(chunks) if _completes_event(chunks, i)]
    assert watch.ttft_s == arrivals[0]
    assert watch.gaps == [b - a for a, b in itertools.pairwise(arrivals)]
    whole = assemble(b"".join(chunks))
    assert whole is not None
    assert whole["choices"][0]["message"]["content"] == "".join(tokens)
    assert whole["choices"][0]["finish_reason"] == "stop"


def _completes_event(chunks: list[bytes], i: int) -> bool:
    before = b"".join(chunks[:i]).replace(b"\r\n", b"\n")
    after = b"".join(chunks[: i + 1]).replace(b"\r\n", b"\n")
    return after.count(b"\n\n") > before.count(b"\n\n")


# --- relay: the same watch, whichever way the chunks travel ---------------------------------------


class Writer:
    """A `ChunkWriter` that keeps what it is given; full (returns False) on the chunks listed."""

    def __init__(self, full_on: frozenset[int] = frozenset()) -> None:
        self.written: list[bytes] = []
        self.full_on = full_on
        self.holding = False
        self.drains = 0
        self.ended = False

    def __call__(self, chunk: bytes) -> bool:
        self.written.append(chunk)
        return len(self.written) - 1 not in self.full_on

    async def drain(self) -> None:
        self.drains += 1

    def end(self) -> None:
        self.ended = True


def pushing(
    arrivals: list[list[bytes]], writer: Writer, fail: Exception | None = None
) -> Callable[[Callable[[bytes], bool], Callable[[], Awaitable[None]]], Awaitable[None]]:
    """An upstream's `push_chunks`: each arrival's chunks pushed in one turn of the loop (the
    writer holds them until its end), then the next arrival."""

    async def push(on_chunk: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]]) -> None:
        for arrival in arrivals:
            writer.holding = False  # the last turn's writes have left
            for chunk in arrival:
                if not on_chunk(chunk):
                    await drain()
                writer.holding = True
        if fail is not None:
            raise fail

    return push


def ticks() -> Callable[[], float]:
    count = itertools.count(1)
    return lambda: float(next(count))


async def _pulled(chunks: list[bytes]) -> Any:
    for chunk in chunks:
        yield chunk


@given(WORDS, st.lists(st.integers(0, 10**6), max_size=30), st.lists(st.integers(0, 40)))
def test_a_pushed_stream_is_watched_by_arrival_as_a_pulled_one(
    tokens: list[str], points: list[int], splits: list[int]
) -> None:
    """A pulled stream's chunk is what one read returned; a pushed one's arrival is what one
    turn of the loop brought, in as many pieces as the parser fed. The watch sees the same."""
    reads = cut(openai_stream(tokens), points)
    arrivals = [cut(read, splits) for read in reads]
    pulled, pushed = StreamWatch(0.0), StreamWatch(0.0)
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    asyncio.run(relay(_pulled(reads), send, pulled, ticks()))
    writer, capture = Writer(full_on=frozenset({0, 3})), []
    push = pushing(arrivals, writer)
    asyncio.run(relay(_pulled([]), send, pushed, ticks(), capture, write=writer, push=push))
    for watch in (pulled, pushed):
        watch.finish()
    assert [m["body"] for m in messages] == [*reads, b""] and messages[-1]["more_body"] is False
    assert writer.written == capture == [c for a in arrivals for c in a] and writer.ended
    assert writer.drains == len({0, 3} & set(range(len(writer.written))))
    facts = ("events", "gaps", "first_at", "done", "completion_tokens", "error_event")
    assert [getattr(pushed, f) for f in facts] == [getattr(pulled, f) for f in facts]


def test_a_stream_cut_while_pushed_keeps_what_came_and_is_not_ended() -> None:
    body = openai_stream(["a", "b"])
    end = body.index(b"\n\n") + 2  # of the role event
    writer, watch = Writer(), StreamWatch(0.0)
    arrivals = [[body[:20]], [body[20 : end - 1], body[end - 1 : end + 9]]]
    push = pushing(arrivals, writer, fail=RuntimeError("cut"))
    with pytest.raises(RuntimeError):
        asyncio.run(relay(_pulled([]), _no_send, watch, ticks(), write=writer, push=push))
    assert not writer.ended and b"".join(writer.written) == body[: end + 9]
    assert watch.events == 1 and watch.first_at == 2.0  # the role event, in the last arrival


def test_with_a_writer_and_nothing_to_push_each_pulled_chunk_is_written() -> None:
    reads = cut(openai_stream(["a"]), [30, 70])
    writer, watch = Writer(full_on=frozenset({1})), StreamWatch(0.0)
    asyncio.run(relay(_pulled(reads), _no_send, watch, ticks(), write=writer))
    assert writer.written == reads and writer.ended and writer.drains == 1
    watch.finish()
    assert watch.done and watch.completion_tokens == 1


async def _no_send(message: dict[str, Any]) -> None:
    raise AssertionError(f"no ASGI message expected with a writer: {message}")


def test_an_error_payload_or_event_is_an_error_event_and_a_token_saying_error_is_not() -> None:
    assert watched([openai_stream(["error", "errors"])]).error_event is False
    payload = b'data: {"error": {"message": "overloaded", "code": 503}}\n\n'
    first_event = openai_stream(["a"]).split(b"\n\n")[0] + b"\n\n"
    assert watched([first_event, payload]).failure(expect_done=True) == "error_event"
    named = b"event: error\ndata: overloaded\n\n"
    assert watched([named, b"data: [DONE]\n\n"]).error_event is True


def test_a_cut_stream_is_aborted_even_if_done_is_not_expected() -> None:
    watch = watched([openai_stream(["a", "b"], done=False)[:90]])
    watch.cut = True
    assert watch.failure(expect_done=False) == "stream_aborted"
    assert watch.completion_tokens is None


def test_only_an_event_stream_content_type_is_watched() -> None:
    assert is_event_stream([(b"x-a", b"1"), (b"content-type", b"text/event-stream; charset=utf-8")])
    assert not is_event_stream([(b"content-type", b"application/json")])
    assert not is_event_stream([])


def test_gap_quantile_is_the_nearest_rank() -> None:
    watch = StreamWatch(0.0)
    watch.gaps = [float(i) for i in range(1, 101)]
    assert watch.gap_quantile(0.99) == 99.0
    assert watch.gap_quantile(0.5) == 50.0
    assert StreamWatch(0.0).gap_quantile(0.99) is None


def test_stream_shadow_metrics() -> None:
    body = openai_stream(["ab", "cde"])
    first = body.index(b"\n\n") + 2
    watch = watched([body[:first], body[first:]])
    assert stream_metric("ttft_ms", body, watch) == 1000.0
    assert stream_metric("completion_tokens", body, watch) == 2.0
    assert stream_metric("len:json:/choices/0/message/content", body, watch) == 5.0
    assert stream_metric("json:/usage/prompt_tokens", body, watch) == 3.0
    whole = orjson.dumps(
        {"choices": [{"message": {"content": "abc"}}], "usage": {"completion_tokens": 7}}
    )
    assert stream_metric("completion_tokens", whole, None) == 7.0
    assert stream_metric("len:json:/choices/0/message/content", whole, None) == 3.0
    assert stream_metric("ttft_ms", whole, None) is None  # a whole answer has no first event
    assert stream_metric("len:json:/missing", whole, None) is None
    assert stream_metric("completion_tokens", b"not json", None) is None


@pytest.mark.parametrize(
    ("raw", "model", "unit"),
    [
        (b'{"model": "llama", "user": "ann"}', "llama", "ann"),
        (b'{"model": 7, "user": 42}', None, "42"),
        (b'{"model": null, "user": true}', None, None),
        (b'["model"]', None, None),
        (b"model=llama", None, None),
        (b"", None, None),
        (None, None, None),
    ],
)
def test_json_body_model_and_unit(raw: bytes | None, model: str | None, unit: str | None) -> None:
    body = JsonBody(raw)
    assert body.model() == model
    assert body.unit("/user") == unit


def test_the_model_rewrite_keeps_every_other_field_and_is_made_once() -> None:
    body = JsonBody(b'{"model": "llama", "messages": [{"role": "user"}], "stream": true}')
    first = body.for_model("llama-v2")
    assert orjson.loads(first) == {
        "model": "llama-v2",
        "messages": [{"role": "user"}],
        "stream": True,
    }
    assert body.for_model("llama-v2") is first
    assert body.for_model("llama") is body.raw  # already that model: sent as it came
    assert JsonBody(b"not json").for_model("x") == b"not json"


def test_json_pointer_escapes() -> None:
    doc = {"a/b": {"m~n": [10, 20]}}
    assert resolve(doc, "/a~1b/m~0n/1") == 20
    assert resolve(doc, "/a~1b/m~0n/2") is None
    assert resolve(doc, "/x") is None


def policy(*errors: str) -> ErrorPolicy:
    return ErrorPolicy.of(Guard(errors=list(errors)))


def stream(*, ttft: float | None, done: bool = True, cut: bool = False, error: bool = False):
    watch = StreamWatch(0.0)
    watch.first_at, watch.done, watch.cut, watch.error_event = ttft, done, cut, error
    return watch


@pytest.mark.parametrize(
    ("errors", "watch", "elapsed", "kind"),
    [
        (("ttft_over:500",), stream(ttft=0.8), 2.0, "ttft_over:500"),
        (("ttft_over:500",), stream(ttft=0.4), 2.0, None),
        (("ttft_over:500",), stream(ttft=None, done=False), 0.6, "ttft_over:500"),
        (("status_5xx",), stream(ttft=0.8), 2.0, None),
        (("status_5xx",), stream(ttft=0.1, done=False), 2.0, None),
        (("stream_aborted",), stream(ttft=0.1, done=False), 2.0, "stream_aborted"),
        (("status_5xx",), stream(ttft=0.1, done=False, cut=True), 2.0, "stream_aborted"),
        (("error_event",), stream(ttft=0.1, error=True), 2.0, "error_event"),
        (("status_5xx",), stream(ttft=0.1, error=True), 2.0, None),
    ],
)
def test_the_guard_kind_of_a_stream(
    errors: tuple[str, ...], watch: StreamWatch, elapsed: float, kind: str | None
) -> None:
    assert policy(*errors).kind_of(200, None, elapsed, watch) == kind


def test_the_guard_kind_of_a_whole_answer_is_unchanged() -> None:
    p = policy("status_5xx", "timeout", "ttft_over:500")
    assert p.kind_of(503, None, 0.1, None) == "status_5xx"
    assert p.kind_of(0, "timeout", 0.1, None) == "timeout"
    assert p.kind_of(200, None, 5.0, None) is None  # ttft_over judges streams only
