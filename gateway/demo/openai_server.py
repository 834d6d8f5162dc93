"""`gateway model-server --openai`: a fake LLM server speaking the OpenAI-compatible API.

For demos, tests and the streaming benchmark, in place of vLLM, TGI or llama.cpp's server. It
answers POST `/v1/chat/completions` and `/v1/completions` (under any path prefix), streamed
(`"stream": true`) or whole, and GET anything with a model list (readiness checks).

A completion is `max_tokens` (default `completion_tokens`) words drawn from a small vocabulary
by a random source seeded with the seed and the request body, so a replay gives the same text.
A streamed answer is Server-Sent Events as the OpenAI API sends them: the first event (the
assistant role) `ttft_ms` after the request, one `data: {chunk}` per token `1 / tokens_per_s`
apart, a chunk with `finish_reason`, a usage chunk (`choices: []`, `usage` with the token
counts, always sent, as vLLM's `--enable-force-include-usage` does), then `data: [DONE]`.

Misbehaviour, drawn once per request from `random.Random(seed)` in arrival order (a fixed
request order gives a fixed pattern): with `error_rate` a 500 before any answer; with
`abort_rate` a stream cut after half its tokens (the connection closes without the chunked
body's end and without `[DONE]`; a whole answer gets a 500 instead); with `error_event_rate` an
SSE error payload after half the tokens (`data: {"error": {...}}`, then `[DONE]`, `error_hold_ms`
later).

With `access_log`, one JSON line per request when its answer starts: `{"ts", "method", "path",
"status", "model" (the model the request named), "server" (this server's name), "stream",
"user", "request_id"}`, and for a stream one more when it ends: `{"ts", "event": "stream_end" |
"stream_aborted" | "error_event" | "client_gone", "tokens", "request_id", "server"}`
(`client_gone`: the client went away first; the stream stops before its next token). A reader
can tell from the file whether a stream had finished at a given moment; with `log_tokens`, also
which tokens had been sent (`{"event": "token", "i", "request_id"}`, written before token i goes
out).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.demo.modelserver import AccessLog, Message, Receive, Scope, Send, wait_disconnect
from gateway.demo.serving import serve_app

VOCABULARY = (
    "the", "model", "answers", "with", "a", "short", "and", "steady", "stream", "of", "words",
    "that", "mean", "nothing", "in", "particular", "but", "arrive", "on", "time",
)  # fmt: skip
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_JSON = [(b"content-type", b"application/json")]
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class OpenAIServerConfig:
    """One fake LLM server: its name, its pace and how it misbehaves."""

    name: str
    tokens_per_s: float = 50.0
    ttft_ms: float = 50.0
    completion_tokens: int = 16
    error_rate: float = 0.0
    abort_rate: float = 0.0
    error_event_rate: float = 0.0
    # After an error event the stream stays open this long before `[DONE]`, as a server
    # still winding down does: a client that hangs up on the event leaves first.
    error_hold_ms: float = 0.0
    seed: int = 0
    access_log: Path | None = None
    log_tokens: bool = False  # one access-log line per streamed token, before it is sent

    def __post_init__(self) -> None:
        problems = []
        if not self.name:
            problems.append("name: must not be empty")
        if not self.tokens_per_s > 0:
            problems.append(f"tokens_per_s: must be > 0, got {self.tokens_per_s}")
        if self.ttft_ms < 0:
            problems.append(f"ttft_ms: must be >= 0, got {self.ttft_ms}")
        if self.error_hold_ms < 0:
            problems.append(f"error_hold_ms: must be >= 0, got {self.error_hold_ms}")
        if self.completion_tokens < 1:
            problems.append(f"completion_tokens: must be >= 1, got {self.completion_tokens}")
        rates = (self.error_rate, self.abort_rate, self.error_event_rate)
        if not all(0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0:
            problems.append(
                f"error, abort and error-event rates: each in [0, 1], sum <= 1: {rates}"
            )
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(slots=True)
class _Request:
    path: str
    chat: bool
    model: str
    stream: bool
    tokens: list[str]
    prompt_tokens: int
    user: object
    request_id: str
    fate: str  # ok | error | abort | error_event


class OpenAIServer:
    """The ASGI app; its random source and access log are per instance."""

    def __init__(self, config: OpenAIServerConfig) -> None:
        self.config = config
        self._fates = random.Random(config.seed)
        self._ids = 0
        self._log = AccessLog(config.access_log) if config.access_log else None
        self._model_header = (b"x-model", config.name.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

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
        body = await _read(receive)
        path: str = scope["path"]
        chat = path.endswith("/v1/chat/completions")
        if scope["method"] != "POST" or not (chat or path.endswith("/v1/completions")):
            models = {"object": "list", "data": [{"id": self.config.name, "object": "model"}]}
            await self._whole(send, 200, models)
            return
        request = self._parse(scope, body, chat)
        if isinstance(request, str):
            await self._whole(send, 400, _error(request, "invalid_request_error", 400))
            return
        self._access(scope, request, 500 if request.fate == "error" else 200)
        if request.fate == "error":
            await self._whole(send, 500, _error("injected failure", "server_error", 500))
        elif request.stream:
            await self._stream(request, receive, send)
        else:
            await self._answer(request, send)

    def _parse(self, scope: Scope, body: bytes, chat: bool) -> _Request | str:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return "the body is not JSON"
        if not isinstance(doc, dict) or not isinstance(doc.get("model"), str):
            return "the body must be a JSON object with a string 'model'"
        limit = doc.get("max_tokens") or doc.get("max_completion_tokens")
        count = limit if isinstance(limit, int) and limit > 0 else self.config.completion_tokens
        words = random.Random(f"{self.config.seed}:".encode() + body)
        prompt = doc.get("messages") if chat else doc.get("prompt")
        headers = dict(scope["headers"])
        return _Request(
            path=scope["path"],
            chat=chat,
            model=doc["model"],
            stream=doc.get("stream") is True,
            tokens=[words.choice(VOCABULARY) for _ in range(count)],
            prompt_tokens=max(1, len(orjson.dumps(prompt).split()) if prompt else 1),
            user=doc.get("user"),
            request_id=headers.get(b"x-request-id", b"").decode("latin-1"),
            fate=self._fate(),
        )

    def _fate(self) -> str:
        c, draw = self.config, self._fates.random()
        for fate, rate in (("error", c.error_rate), ("abort", c.abort_rate)):
            if draw < rate:
                return fate
            draw -= rate
        return "error_event" if draw < c.error_event_rate else "ok"

    async def _answer(self, request: _Request, send: Send) -> None:
        c = self.config
        await asyncio.sleep((c.ttft_ms + 1000.0 * len(request.tokens) / c.tokens_per_s) / 1000)
        if request.fate in ("abort", "error_event"):
            await self._whole(send, 500, _error("injected failure", "server_error", 500))
            return
        text = " ".join(request.tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if request.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice |= {"text": text, "logprobs": None}
        answer = self._envelope(request, "chat.completion" if request.chat else "text_completion")
        answer |= {"choices": [choice], "usage": _usage(request, len(request.tokens))}
        await self._whole(send, 200, answer)

    async def _stream(self, request: _Request, receive: Receive, send: Send) -> None:
        start = asyncio.get_running_loop().time()
        headers = [*_SSE, self._model_header]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        # uvicorn drops writes after a disconnect silently, so receive() tells of it instead.
        gone = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await self._events(request, send, start, gone)
        finally:
            gone.cancel()

    async def _events(
        self, request: _Request, send: Send, start: float, gone: asyncio.Future[None]
    ) -> None:
        c = self.config
        loop = asyncio.get_running_loop()
        kind = "chat.completion.chunk" if request.chat else "text_completion"
        envelope = self._envelope(request, kind)
        cut = len(request.tokens) // 2 if request.fate != "ok" else -1
        await _sleep_until(loop, start + c.ttft_ms / 1000.0)
        if request.chat:
            await _event(send, {**envelope, "choices": [_delta({"role": "assistant"}, None)]})
        for i, token in enumerate(request.tokens):
            if i == cut:
                await self._misbehave(request, send, i)
                return
            if i:
                await _sleep_until(loop, start + c.ttft_ms / 1000.0 + i / c.tokens_per_s)
            if gone.done():
                self._end(request, "client_gone", i)
                return
            if c.log_tokens and self._log:
                self._log.write({"event": "token", "i": i, "request_id": request.request_id})
            piece = token if i == 0 else " " + token
            choice = _delta({"content": piece}, None) if request.chat else _text(piece, None)
            await _event(send, {**envelope, "choices": [choice]})
        final = _delta({}, "stop") if request.chat else _text("", "stop")
        await _event(send, {**envelope, "choices": [final]})
        usage = _usage(request, len(request.tokens))
        await _event(send, {**envelope, "choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": _DONE, "more_body": False})
        self._end(request, "stream_end", len(request.tokens))

    async def _misbehave(self, request: _Request, send: Send, sent: int) -> None:
        if request.fate == "error_event":
            await _event(send, _error("injected error event", "server_error", 500))
            if self.config.error_hold_ms:
                await asyncio.sleep(self.config.error_hold_ms / 1000.0)
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
            self._end(request, "error_event", sent)
            return
        # Returning without the body's end makes uvicorn close the connection: the client
        # (and a proxy) sees a chunked body that stops short, as when a server dies mid-answer.
        self._end(request, "stream_aborted", sent)

    def _envelope(self, request: _Request, kind: str) -> dict[str, Any]:
        self._ids += 1
        prefix = "chatcmpl" if request.chat else "cmpl"
        return {
            "id": f"{prefix}-{self.config.name}-{self._ids}",
            "object": kind,
            "created": int(time.time()),
            "model": request.model,
        }

    async def _whole(self, send: Send, status: int, doc: dict[str, Any]) -> None:
        body = orjson.dumps(doc)
        headers = [*_JSON, (b"content-length", str(len(body)).encode()), self._model_header]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _access(self, scope: Scope, request: _Request, status: int) -> None:
        if self._log:
            record = {"ts": time.time(), "method": scope["method"], "path": request.path}
            self._log.write(
                {
                    **record,
                    "status": status,
                    "model": request.model,
                    "server": self.config.name,
                    "stream": request.stream,
                    "user": request.user,
                    "request_id": request.request_id,
                }
            )

    def _end(self, request: _Request, event: str, tokens: int) -> None:
        if self._log:
            self._log.write(
                {
                    "ts": time.time(),
                    "event": event,
                    "tokens": tokens,
                    "request_id": request.request_id,
                    "server": self.config.name,
                }
            )


def _delta(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _text(text: str, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _usage(request: _Request, completion: int) -> dict[str, int]:
    prompt = request.prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _error(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def _event(send: Send, doc: dict[str, Any]) -> None:
    body = b"data: " + orjson.dumps(doc) + b"\n\n"
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    # Scheduled from the stream's start, not from the last send: no drift over a long answer.
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _read(receive: Receive) -> bytes:
    chunks = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def create_app(config: OpenAIServerConfig) -> OpenAIServer:
    return OpenAIServer(config)


def run(config: OpenAIServerConfig, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `config` until SIGINT/SIGTERM."""
    # an aborted stream is on purpose: no traceback-like error line
    serve_app(create_app(config), host=host, port=port, log_level="critical")
