"""The bundled model server: a fake ML model for demos, tests, compose and the benchmark.

`create_app(config)` returns a plain ASGI app; `run(config, host=..., port=...)` serves it with
uvicorn (uvloop + httptools, access log off). It answers any path and method:

- POST: `{"model": NAME, "score": s}` with `s = f(body) + score_offset + noise`. `f` maps a
  keyed blake2b hash of the body to [0, 1); `noise` is uniform in [-0.1, 0.1), drawn from a
  second blake2b hash keyed by the seed. Replaying a body gives the same score, and two servers
  with different seeds and offsets differ by `offset_b - offset_a` on average, with
  `var(d) = 2 * 0.2**2 / 12` (the difference of two independent U(-0.1, 0.1)).
- any other method: an echo `{"model", "method", "path", "raw_path", "query", "headers",
  "body_bytes"}`; header names are lower case and repeated names are joined by ", ", so a test
  sees exactly which headers reached the upstream. HEAD answers like GET without a body.

Every response carries `x-model: NAME`. Request bodies of any size are streamed in (hashed or
counted chunk by chunk, never buffered) before answering. Apart from the test hooks below, a
request waits `latency_ms +- uniform(jitter_ms)` and then fails with 500
`{"model": NAME, "error": "injected"}` with probability `error_rate`, drawn from a
`random.Random(seed)` per process (so a fixed request order gives a fixed failure pattern).
With `score_fault` `nan` (or `missing`), a POST answer carries `"score": "NaN"` (or no score)
with probability `score_fault_rate`, drawn the same way: a model whose metric cannot be read.

Test hooks (GET or HEAD; never delayed or failed; also under any prefix, e.g. `/v1/x/_stall`):

- `/_bytes/N`: N bytes streamed in 64 KiB chunks with a content-length (a 50 MB response must
  stream through a proxy).
- `/_stall`: never answers; returns when the client goes away (timeout tests).
- `/_slow_stream/N`: N chunks of 64 KiB, 50 ms apart (client-disconnect tests). When the client
  goes away first, the access log gets `{"ts", "event": "stream_aborted", "sent": k, ...}` with
  k the number of chunks handed to the server before the disconnect was seen.
- `/_cut/N`: a 200 head announcing N bytes (Content-Length), N // 2 of them, then the
  connection is reset (an upstream that dies mid-body). `/_cut_chunked/N`: the same with a
  chunked body, reset before its last chunk.
- `/_garbage`: bytes that are not an HTTP response, then the connection closes (under
  uvicorn's httptools server, which the model server runs on).

A request whose body never completes (the client went away mid-body) gets no answer; the access
log records `{"ts", "event": "request_aborted", "body_bytes": n, ...}` instead of a status, so
a test can tell a truncated body from a served request.

With `access_log` set, one JSON line `{"ts", "method", "path", "status", "model"}` is appended
and flushed per request when its response starts (tests read it to find when a canary was last
called).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from gateway.demo.serving import serve_app

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHUNK_BYTES = 64 * 1024
SLOW_STREAM_GAP_S = 0.05
NOISE_HALF_WIDTH = 0.1
# One immutable chunk reused for every streamed hook response: no allocation per chunk.
_CHUNK = bytes(range(256)) * (CHUNK_BYTES // 256)
_JSON = (b"content-type", b"application/json")


@dataclass(frozen=True, slots=True)
class ModelServerConfig:
    """What one model server instance is: its name and how it misbehaves."""

    name: str
    error_rate: float = 0.0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    score_offset: float = 0.0
    seed: int = 0
    access_log: Path | None = None
    score_fault: Literal["none", "nan", "missing"] = "none"
    score_fault_rate: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate: must be within [0, 1], got {self.error_rate}")
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError("latency_ms, jitter_ms: must be >= 0")
        if self.score_fault not in ("none", "nan", "missing"):
            raise ValueError(f"score_fault: must be none, nan or missing, got {self.score_fault}")
        if not 0.0 <= self.score_fault_rate <= 1.0:
            rate = self.score_fault_rate
            raise ValueError(f"score_fault_rate: must be within [0, 1], got {rate}")


class Scorer:
    """f(body) and the seeded noise, fed chunk by chunk so a body is never held in memory."""

    __slots__ = ("_base", "_noise")

    def __init__(self, base: Any, noise: Any) -> None:
        self._base = base
        self._noise = noise

    @classmethod
    def for_seed(cls, seed: int) -> Scorer:
        # Two differently personalised hashes: f must not depend on the seed, the noise must.
        key = str(seed).encode()
        return cls(
            hashlib.blake2b(digest_size=8, person=b"gw-score"),
            hashlib.blake2b(digest_size=8, key=key, person=b"gw-noise"),
        )

    def copy(self) -> Scorer:
        return Scorer(self._base.copy(), self._noise.copy())

    def update(self, chunk: bytes) -> None:
        self._base.update(chunk)
        self._noise.update(chunk)

    def score(self, offset: float) -> float:
        noise = (2.0 * _unit(self._noise.digest()) - 1.0) * NOISE_HALF_WIDTH
        return _unit(self._base.digest()) + offset + noise


def _unit(digest: bytes) -> float:
    """Map a 64-bit digest to [0, 1): its top 53 bits, so the float never rounds up to 1."""
    return (int.from_bytes(digest, "big") >> 11) / 2.0**53


def score_of(body: bytes, *, seed: int = 0, offset: float = 0.0) -> float:
    """The score a server with this seed and offset gives `body` (for demos and tests)."""
    scorer = Scorer.for_seed(seed)
    scorer.update(body)
    return scorer.score(offset)


class AccessLog:
    """JSON lines, flushed one by one: readers are tests polling the file while we run."""

    def __init__(self, path: Path) -> None:
        self._file: IO[bytes] = path.open("ab")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(orjson.dumps(record) + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ModelServer:
    """The ASGI app. State is per instance: its random sources and its access log."""

    def __init__(self, config: ModelServerConfig) -> None:
        self.config = config
        self._name = config.name.encode()
        self._model_header = (b"x-model", self._name)
        self._scorer = Scorer.for_seed(config.seed)
        # Separate streams so turning jitter on never changes which requests fail.
        self._errors = random.Random(config.seed)
        self._score_faults = random.Random(config.seed + 1)
        self._jitter = random.Random(f"{config.seed}:jitter")
        self._log = AccessLog(config.access_log) if config.access_log else None
        self._error_body = orjson.dumps({"model": config.name, "error": "injected"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._log:
                    self._log.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        hook_at = path.find("/_")
        if hook_at >= 0 and method in ("GET", "HEAD"):
            # Hooks work behind a route prefix too: /v1/sentiment/_bytes/N is /_bytes/N.
            hook = _HOOKS.get(path[hook_at:].split("/", 2)[1])
            if hook is not None:
                await _drain(receive)
                await hook(self, scope, receive, send)
                return
        fail = self.config.error_rate > 0 and self._errors.random() < self.config.error_rate
        counter = _Counter()
        if method == "POST":
            scorer = self._scorer.copy()
            complete = await _drain(receive, scorer.update, counter)
            answer: dict[str, Any] = {"model": self.config.name}
            answer["score"] = scorer.score(self.config.score_offset)
            faulty = self.config.score_fault != "none"
            if faulty and self._score_faults.random() < self.config.score_fault_rate:
                _spoil_score(answer, self.config.score_fault)
            body = orjson.dumps(answer)
        else:
            complete = await _drain(receive, None, counter)
            body = self._echo(scope, counter.n)
        if not complete:
            self._log_event(scope, "request_aborted", body_bytes=counter.n)
            return
        await self._delay()
        if fail:
            await self._respond(scope, send, 500, self._error_body)
        else:
            await self._respond(scope, send, 200, body)

    def _echo(self, scope: Scope, body_bytes: int) -> bytes:
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return orjson.dumps(
            {
                "model": self.config.name,
                "method": scope["method"],
                "path": scope["path"],
                "raw_path": (scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
                "query": scope["query_string"].decode("latin-1"),
                "headers": headers,
                "body_bytes": body_bytes,
            }
        )

    async def _delay(self) -> None:
        delay_ms = self.config.latency_ms
        if self.config.jitter_ms:
            delay_ms += self._jitter.uniform(-self.config.jitter_ms, self.config.jitter_ms)
        if delay_ms > 0:
            # At least the delay, as a clock outside the loop measures it: the loop's timers
            # may fire up to a millisecond early (uvloop keeps whole milliseconds).
            end = time.perf_counter() + delay_ms / 1000.0
            await asyncio.sleep(delay_ms / 1000.0)
            if (left := end - time.perf_counter()) > 0:
                await asyncio.sleep(left + 0.001)

    async def _respond(self, scope: Scope, send: Send, status: int, body: bytes) -> None:
        await self._start(scope, send, status, len(body), _JSON)
        if scope["method"] == "HEAD":
            body = b""
        await send({"type": "http.response.body", "body": body})

    async def _start(
        self, scope: Scope, send: Send, status: int, length: int, *extra: tuple[bytes, bytes]
    ) -> None:
        if self._log:
            record = {"ts": time.time(), "method": scope["method"], "path": scope["path"]}
            self._log.write({**record, "status": status, "model": self.config.name})
        headers = [self._model_header, (b"content-length", str(length).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def _bytes(self, scope: Scope, receive: Receive, send: Send) -> None:
        size = _count_arg(scope["path"])
        if size is None:
            await self._respond(scope, send, 400, b'{"error": "expected /_bytes/N"}')
            return
        await self._start(scope, send, 200, size, (b"content-type", b"application/octet-stream"))
        left = 0 if scope["method"] == "HEAD" else size
        while left > 0:
            chunk = _CHUNK if left >= CHUNK_BYTES else _CHUNK[:left]
            left -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
        if scope["method"] == "HEAD" or size == 0:
            await send({"type": "http.response.body", "body": b""})

    async def _stall(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _slow_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks = _count_arg(scope["path"])
        if chunks is None:
            await self._respond(scope, send, 400, b'{"error": "expected /_slow_stream/N"}')
            return
        octets = (b"content-type", b"application/octet-stream")
        await self._start(scope, send, 200, chunks * CHUNK_BYTES, octets)
        # uvicorn drops writes after a disconnect silently, so watch receive() for it instead.
        gone = asyncio.create_task(wait_disconnect(receive))
        sent = 0
        try:
            while sent < chunks and not gone.done():
                await send({"type": "http.response.body", "body": _CHUNK, "more_body": True})
                sent += 1
                if sent < chunks:
                    await asyncio.wait({gone}, timeout=SLOW_STREAM_GAP_S)
        finally:
            gone.cancel()
        if sent < chunks:
            self._log_abort(scope, sent)
            return
        await send({"type": "http.response.body", "body": b""})

    def _log_abort(self, scope: Scope, sent: int) -> None:
        self._log_event(scope, "stream_aborted", sent=sent)

    def _log_event(self, scope: Scope, event: str, **fields: int) -> None:
        if self._log:
            record = {"ts": time.time(), "event": event, **fields}
            self._log.write({**record, "path": scope["path"], "model": self.config.name})

    async def _garbage(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if transport is None:
            await self._respond(scope, send, 400, b'{"error": "needs the httptools server"}')
            return
        transport.write(b"SURPRISE NOT HTTP\r\n\r\n")
        transport.close()
        await asyncio.sleep(0)  # uvicorn sees the connection lost before the app returns

    async def _cut(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._cut_off(scope, send, chunked=False)

    async def _cut_chunked(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._cut_off(scope, send, chunked=True)

    async def _cut_off(self, scope: Scope, send: Send, *, chunked: bool) -> None:
        size = _count_arg(scope["path"])
        if size is None:
            await self._respond(scope, send, 400, b'{"error": "expected /_cut/N"}')
            return
        octets = (b"content-type", b"application/octet-stream")
        if chunked:  # no Content-Length: uvicorn frames the body in chunks
            await send({"type": "http.response.start", "status": 200, "headers": [octets]})
        else:
            await self._start(scope, send, 200, size, octets)
        await send({"type": "http.response.body", "body": b"x" * (size // 2), "more_body": True})
        await asyncio.sleep(0.05)  # let the half leave before the reset
        # uvicorn's httptools `send` is bound to its request cycle, which holds the transport;
        # under another server the app just returns and the server closes the connection.
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if transport is not None:
            transport.abort()
            await asyncio.sleep(0)  # uvicorn sees the connection lost before the app returns


_Hook = Callable[[ModelServer, Scope, Receive, Send], Awaitable[None]]
_HOOKS: dict[str, _Hook] = {
    "_bytes": ModelServer._bytes,
    "_stall": ModelServer._stall,
    "_slow_stream": ModelServer._slow_stream,
    "_cut": ModelServer._cut,
    "_cut_chunked": ModelServer._cut_chunked,
    "_garbage": ModelServer._garbage,
}


class _Counter:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def update(self, chunk: bytes) -> None:
        self.n += len(chunk)


def _spoil_score(answer: dict[str, Any], fault: str) -> None:
    if fault == "nan":
        answer["score"] = "NaN"  # what a model that serialises NaN as a string sends
    elif fault == "missing":
        del answer["score"]


async def _drain(
    receive: Receive,
    sink: Callable[[bytes], None] | None = None,
    counter: _Counter | None = None,
) -> bool:
    """Read the whole request body, handing each chunk to `sink` and counting its bytes in
    `counter`; False if the client went away before the body's end."""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        chunk = message.get("body", b"")
        if sink is not None:
            sink(chunk)
        if counter is not None:
            counter.update(chunk)
        more = message.get("more_body", False)
    return True


async def wait_disconnect(receive: Receive) -> None:
    """Return once the client has gone (uvicorn's receive() says so)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _count_arg(path: str) -> int | None:
    """The N of `[/prefix]/_hook/N`, or None when it is missing or not a non-negative integer."""
    parts = path[path.find("/_") :].split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return int(parts[2])


def create_app(config: ModelServerConfig) -> ModelServer:
    return ModelServer(config)


def run(config: ModelServerConfig, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `config` until SIGINT/SIGTERM."""
    serve_app(create_app(config), host=host, port=port)
