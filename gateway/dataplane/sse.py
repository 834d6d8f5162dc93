"""Server-Sent Event streams (`text/event-stream`): relayed unbuffered, and watched on the way.

Only responses whose Content-Type is `text/event-stream` come here; every other response keeps
the plain relay. A `StreamWatch` is fed each chunk as it is relayed and keeps what the metrics,
the guard and the shadows need, and no more:

- TTFT: from the request's start to the first complete event;
- gaps: the time between arrivals of complete events (events that arrive in one read are one
  arrival: that is what the client sees too);
- events, whether the terminal `data: [DONE]` came, whether an error payload came (an
  `event: error` or a data payload that is a JSON object with an "error" member), and the last
  data payload, whose `usage.completion_tokens` is read once the stream ends (the OpenAI API's
  final usage chunk).

The per-chunk work is a split on the blank line between events and a few byte comparisons per
event, all in C; JSON is parsed only for an event that mentions "error" and for the last one.

`relay` moves the chunks. Where the server offers a `ChunkWriter` (the scope's `CHUNK_WRITER`,
dataplane/servers.py) and the upstream response can push its body (`push_chunks`: the httptools
and the direct aiohttp clients), each chunk goes from the upstream's parser to the client's
connection in one synchronous call, and the relaying coroutine wakes only at the end of the
body or to wait for a slow client. Otherwise it pulls chunks and sends ASGI messages.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.dataplane.bodyroute import resolve

if TYPE_CHECKING:
    from gateway.dataplane.servers import ChunkWriter

_DONE = (b"data: [DONE]", b"data:[DONE]")

Send = Callable[[dict[str, Any]], Awaitable[None]]
# `push(on_chunk, drain)`: an upstream response's `push_chunks` (dataplane/upstream/base.py).
Push = Callable[[Callable[[bytes], bool], Callable[[], Awaitable[None]]], Awaitable[None]]


class StreamWatch:
    """One event stream's timings and facts, fed chunk by chunk (`feed`) then `finish`ed."""

    __slots__ = (
        "_last_data", "_partial", "client_left", "completion_tokens", "cut", "done",
        "error_event", "events", "first_at", "gaps", "last_at", "started",
    )  # fmt: skip

    def __init__(self, started: float) -> None:
        self.started = started
        self.first_at: float | None = None
        self.last_at = started
        self.events = 0
        self.gaps: list[float] = []
        self.done = False  # `data: [DONE]` arrived
        self.error_event = False
        self.cut = False  # the upstream failed mid-body
        self.client_left = False  # the client went away before the stream ended
        self.completion_tokens: int | None = None
        self._partial = b""
        self._last_data = b""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.started

    def feed(self, chunk: bytes, now: float) -> None:
        buf = self._partial + chunk if self._partial else chunk
        carry = b""
        if buf.find(b"\r") >= 0:
            if buf[-1:] == b"\r":  # maybe half of a CRLF that the next chunk completes
                buf, carry = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = buf.split(b"\n\n")
        self._partial = events.pop() + carry
        if not events:
            return
        if self.first_at is None:
            self.first_at = now
        else:
            self.gaps.append(now - self.last_at)
        self.last_at = now
        for event in events:
            if not event:
                continue
            self.events += 1
            if event in _DONE:
                self.done = True
            elif event.find(b"error") >= 0 and _is_error(event):
                self.error_event = True
            elif event[:5] == b"data:":
                self._last_data = event

    def finish(self) -> None:
        """The stream is over: read the completion tokens from the last usage chunk."""
        if self._partial.strip():
            self.feed(b"\n\n", self.last_at)  # a last event without its blank line
        usage = _data(self._last_data)
        usage = usage.get("usage") if isinstance(usage, dict) else None
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
            self.completion_tokens = tokens

    def failure(self, *, expect_done: bool) -> str | None:
        """The stream's own failure kind, if any: `error_event`, or `stream_aborted` when it was
        cut mid-body or, if `expect_done` (not every SSE server sends `[DONE]`), ended
        without it; a stream its client left is not the upstream's failure for that."""
        if self.error_event:
            return "error_event"
        if self.client_left:
            return None  # it ended when the client went, not when the upstream did
        return "stream_aborted" if self.cut or (expect_done and not self.done) else None

    def gap_quantile(self, q: float) -> float | None:
        """The q-quantile of the gaps (nearest rank), None without any gap."""
        if not self.gaps:
            return None
        ordered = sorted(self.gaps)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def relay(
    chunks: AsyncIterator[bytes],
    send: Send,
    watch: StreamWatch,
    clock: Callable[[], float],
    capture: list[bytes] | None = None,
    *,
    write: ChunkWriter | None = None,
    push: Push | None = None,
) -> None:
    """Send each chunk to the client as soon as it arrives, then end the body.

    Unlike the plain relay, nothing is held back to mark the last chunk: an event must reach
    the client when it reaches the gateway. With `write` (the server's `ChunkWriter`) the
    chunks go straight to the client's connection, pushed by the upstream where it offers
    `push`; without it each is an ASGI message, and the end one empty message more.
    """
    if write is None:
        async for chunk in chunks:
            watch.feed(chunk, clock())
            if capture is not None:
                capture.append(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if push is None:
        async for chunk in chunks:
            watch.feed(chunk, clock())
            if capture is not None:
                capture.append(chunk)
            if not write(chunk):
                await write.drain()
    else:
        arrivals = _Arrivals(watch, clock, capture, write)
        try:
            await push(arrivals.take, write.drain)
        finally:
            arrivals.close()
    write.end()


class _Arrivals:
    """Pushed chunks, written to the client at once and fed to the watch by arrival.

    Chunks written in one turn of the event loop leave for the client together (the
    `ChunkWriter` is `holding` them): one arrival, fed to the watch as one piece at the time
    its first chunk came, as the pull way feeds what one read of the upstream returned. An
    arrival is fed when the next one begins, or at `close`; the watch's figures come from the
    times it is given, so they do not depend on when it is fed.
    """

    __slots__ = ("_at", "_capture", "_clock", "_pending", "_watch", "_write")

    def __init__(
        self,
        watch: StreamWatch,
        clock: Callable[[], float],
        capture: list[bytes] | None,
        write: ChunkWriter,
    ) -> None:
        self._watch, self._clock, self._capture, self._write = watch, clock, capture, write
        self._pending: list[bytes] = []
        self._at = 0.0

    def take(self, chunk: bytes) -> bool:
        pending = self._pending
        if not pending:
            self._at = self._clock()
        elif not self._write.holding:  # the last arrival has left: this chunk begins one
            self._feed()
            self._at = self._clock()
        pending.append(chunk)
        if self._capture is not None:
            self._capture.append(chunk)
        return self._write(chunk)

    def close(self) -> None:
        if self._pending:
            self._feed()

    def _feed(self) -> None:
        pending = self._pending
        self._watch.feed(pending[0] if len(pending) == 1 else b"".join(pending), self._at)
        pending.clear()


def _data(event: bytes) -> object:
    """The JSON of an event's data lines (joined as the SSE spec says), or None."""
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line[:5] == b"data:"]
    if not lines:
        return None
    try:
        return orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None


def _is_error(event: bytes) -> bool:
    if b"\nevent: error" in b"\n" + event or b"\nevent:error" in b"\n" + event:
        return True
    doc = _data(event)
    return isinstance(doc, dict) and doc.get("error") is not None


def assemble(body: bytes) -> dict[str, Any] | None:
    """A streamed OpenAI answer put back together as the whole answer would read.

    Chat deltas become `choices[i].message` (role, content), text completions `choices[i].text`;
    `finish_reason`, `model`, `id` and the final `usage` are kept. None when `body` holds no
    data events. Used off the request path, by shadow metrics such as
    `len:json:/choices/0/message/content`.
    """
    doc: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    seen = False
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        chunk = _data(event)
        if not isinstance(chunk, dict):
            continue
        seen = True
        for key in ("id", "model", "usage"):
            if chunk.get(key) is not None:
                doc[key] = chunk[key]
        for part in chunk.get("choices") or []:
            if isinstance(part, dict):
                _merge_choice(choices, part)
    if not seen:
        return None
    doc["choices"] = [choices[i] for i in sorted(choices)]
    return doc


def _merge_choice(choices: dict[int, dict[str, Any]], part: dict[str, Any]) -> None:
    index = part.get("index", 0)
    index = index if isinstance(index, int) else 0
    choice = choices.setdefault(index, {"index": index})
    delta = part.get("delta")
    if isinstance(delta, dict):
        message = choice.setdefault("message", {"role": "assistant", "content": ""})
        if isinstance(delta.get("role"), str):
            message["role"] = delta["role"]
        if isinstance(delta.get("content"), str):
            message["content"] += delta["content"]
    if isinstance(part.get("text"), str):
        choice["text"] = choice.get("text", "") + part["text"]
    if part.get("finish_reason") is not None:
        choice["finish_reason"] = part["finish_reason"]


def stream_metric(metric: str, body: bytes, stream: StreamWatch | None) -> float | None:
    """The shadow metrics for LLM answers (DESIGN 6), None where an answer has no value.

    `ttft_ms`, `stream_gap_p99_ms`: from the stream's timings (None for a whole answer);
    `completion_tokens`: the stream's final usage, or a whole answer's `usage`;
    `json:/pointer` and `len:json:/pointer`: on the answer, a stream being first put back
    together (`assemble`); `len:` takes the length of the string, list or object there.
    """
    if metric == "ttft_ms":
        ttft = stream.ttft_s if stream is not None else None
        return None if ttft is None else ttft * 1000.0
    if metric == "stream_gap_p99_ms":
        gap = stream.gap_quantile(0.99) if stream is not None else None
        return None if gap is None else gap * 1000.0
    doc = assemble(body) if stream is not None else _json(body)
    if metric == "completion_tokens":
        if stream is not None:
            return None if stream.completion_tokens is None else float(stream.completion_tokens)
        metric = "json:/usage/completion_tokens"
    length = metric.startswith("len:")
    value = resolve(doc, metric.removeprefix("len:").removeprefix("json:"))
    if length:
        return float(len(value)) if isinstance(value, str | list | dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _json(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
