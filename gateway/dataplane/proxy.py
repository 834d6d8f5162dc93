"""The request path: route, assign, forward, stream back, record (DESIGN 1, 3, 10).

Plain ASGI on purpose: Starlette's Request and Response objects would cost a proxied request
more than its own routing does (DESIGN 1; the figures are in bench/RESULTS.md). Everything here
reads the replica's in-memory snapshot; nothing waits on Redis. Every upstream client keeps
the same promises (`gateway/dataplane/upstream/base.py`), so nothing here depends on which one
runs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import orjson

from gateway.control.guard import CanaryGuard
from gateway.control.runtime import Arm, FlagRuntime, Router
from gateway.control.shadow import Mirror, Outcome, Pairing
from gateway.core.assignment import COOKIE_NAME, Assignment
from gateway.dataplane.bodyroute import JsonBody
from gateway.dataplane.deadlines import Deadlines
from gateway.dataplane.headers import forwarded_request_headers, response_headers
from gateway.dataplane.servers import ABORT_RESPONSE, CHUNK_WRITER, RESPOND_WHOLE, ChunkWriter
from gateway.dataplane.sse import StreamWatch
from gateway.dataplane.sse import relay as relay_events
from gateway.dataplane.upstream import UpstreamResponse
from gateway.errors import UnsendableRequest, UpstreamError, UpstreamTimeout
from gateway.settings import Settings

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
RespondWhole = Callable[[Send, int, list[tuple[bytes, bytes]], bytes], bool]
AbortResponse = Callable[[Send], bool]
ChunkWriterFor = Callable[[Send], ChunkWriter | None]
_NONE: dict[str, Any] = {}

# httptools sets no limit on the request head, so the gateway refuses big ones itself (431)
# rather than forward them: nginx allows 32 KiB by default, Node 16 KiB.
MAX_HEADER_BYTES = 64 * 1024
# How long an exchange runs before a task watches for its client leaving (see `_forward`).
WATCH_AFTER_S = 0.02
_JSON = (b"content-type", b"application/json")
_HTTP_VERSIONS = frozenset({"1.0", "1.1"})
_UNREAD = object()  # the request body has not been read yet
# The error kind of an upstream that failed after the response head went out to the client.
MID_BODY = "mid_body"


class _Capture(list[bytes]):
    """The first bytes of a response body, kept up to `limit` for a shadow metric."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.size, self.limit = 0, limit

    def append(self, chunk: bytes) -> None:
        if self.size <= self.limit:
            super().append(chunk)
            self.size += len(chunk)


class ProxiedRequest:
    """One proxied request: what every attempt (primary, fallback) and the mirror share."""

    __slots__ = (
        "abort_response", "assignment", "body", "chunk_writer", "client_gone", "finished", "flag",
        "headers", "json", "method", "outcome", "pairing", "receive", "request_id",
        "respond_whole", "send", "target", "watcher",
    )  # fmt: skip

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        flag: FlagRuntime,
        assignment: Assignment,
        request_id: bytes,
        body: bytes | _StreamedBody | None,
        json: JsonBody | None = None,
    ) -> None:
        self.receive, self.send, self.flag = receive, send, flag
        # The server's one-call answer and reset (dataplane/servers.py), where it offers them.
        extensions = scope.get("extensions", _NONE)
        self.respond_whole: RespondWhole | None = extensions.get(RESPOND_WHOLE)
        self.abort_response: AbortResponse | None = extensions.get(ABORT_RESPONSE)
        self.chunk_writer: ChunkWriterFor | None = extensions.get(CHUNK_WRITER)
        self.assignment, self.request_id, self.body = assignment, request_id, body
        self.method: str = scope["method"]
        self.target = _target(scope)
        self.headers = _forwarded_headers(scope, request_id)
        self.pairing: Pairing | None = None
        self.outcome: Outcome | None = None
        self.client_gone = False
        self.finished = False
        self.watcher: asyncio.Future[Message] | None = None
        self.json = json  # the parsed body, for flags that read it

    def body_for(self, arm: Arm) -> bytes | _StreamedBody | None:
        """What `arm`'s upstream receives: the body, with the arm's "model" when it has one."""
        if arm.model is None or self.json is None:
            return self.body
        return self.json.for_model(arm.model)

    def extra(self, arm: Arm) -> list[tuple[bytes, bytes]]:
        return _variant_headers(arm, self.request_id, self.assignment)

    def capture(self) -> _Capture | None:
        pairing = self.pairing
        return _Capture(pairing.capture_limit) if pairing and pairing.wants_body else None


class BodyTooLarge(Exception):
    """The request body grew past `max_body_bytes` while streaming."""


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class ResponseAborted(Exception):
    """Raised out of the app when the upstream failed after the response head went out and the
    server offers no direct way to abort: an ASGI server closes the connection of an app that
    raises after starting its response, so the client sees a failed transfer (see
    `abort_client`)."""


class _Facts:
    """Request attributes for targeting rules, read lazily from the ASGI scope."""

    __slots__ = ("_cookies", "_headers", "_query", "_query_string", "json")

    def __init__(self, headers: list[tuple[bytes, bytes]], query_string: bytes) -> None:
        self._headers = headers
        self._query_string = query_string
        self._cookies: dict[str, str] | None = None
        self._query: dict[str, str] | None = None
        self.json: JsonBody | None = None  # set only for flags that read the body

    def body(self, pointer: str) -> str | None:
        return self.json.unit(pointer) if self.json is not None else None

    def header(self, name: str) -> str | None:
        wanted = name.encode("latin-1")
        for key, value in self._headers:
            if key == wanted:
                return value.decode("latin-1")
        return None

    def cookie(self, name: str) -> str | None:
        if self._cookies is None:
            self._cookies = {}
            for key, value in self._headers:
                if key == b"cookie":
                    for part in value.decode("latin-1").split(";"):
                        k, sep, v = part.strip().partition("=")
                        if sep:
                            self._cookies.setdefault(k, v)
        return self._cookies.get(name)

    def query(self, name: str) -> str | None:
        if self._query is None:
            from urllib.parse import parse_qsl

            self._query = dict(parse_qsl(self._query_string.decode("latin-1")))
        return self._query.get(name)


class Proxy:
    """The data-plane ASGI app."""

    def __init__(
        self, settings: Settings, snapshot: Callable[[], Router], mirror: Mirror | None = None
    ) -> None:
        self._snapshot = snapshot
        self.mirror = mirror
        limits = settings.upstream
        self._max_body = limits.max_body_bytes
        self._buffer_limit = max(limits.mirror_max_body_bytes, 64 * 1024)
        self._rand = random.Random().random
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(6).hex()
        self.in_flight = 0
        self._watch_after: Deadlines[ProxiedRequest, asyncio.Task[Any]] = Deadlines(
            WATCH_AFTER_S, _watch_client, resolution_s=WATCH_AFTER_S / 2
        )

    def close(self) -> None:
        """Drop the client watches still waiting to start: the server has stopped."""
        self._watch_after.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        self.in_flight += 1
        try:
            await self._handle(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        request_id = _header(headers, b"x-request-id")
        if request_id is None or not _valid_request_id(request_id):
            request_id = f"{self._id_prefix}-{next(self._ids)}".encode()
        refused = _head_problem(headers)
        if refused is not None:
            await _error(send, *refused, request_id)
            return
        problem = _path_problem(scope)
        if problem is None and scope["http_version"] not in _HTTP_VERSIONS:
            # An HTTP/0.9 request line, which both servers' parser (llhttp) takes as a request.
            problem = "only HTTP/1.0 and HTTP/1.1 requests are served"
        if problem is not None:
            await _error(send, 400, "bad_request", problem, request_id)
            return
        router = self._snapshot()
        host = _request_host(headers) if router.needs_host else None
        flag = router.match(scope["path"], host, scope["method"])
        if flag is None:
            await _error(send, 404, "no_route", "no flag routes this path", request_id)
            return
        length = _header(headers, b"content-length")
        declared_too_large = False
        if length is not None:
            if not length.isdigit():
                await _error(send, 400, "bad_request", "invalid Content-Length", request_id)
                return
            declared_too_large = int(length) > self._max_body
        facts = _Facts(headers, scope["query_string"])
        body: object = _UNREAD
        if flag.reads_body:
            if declared_too_large:
                flag.count_unassigned(413)
                await self._too_large(send, request_id, [])
                return
            try:
                body = await self._read_body(receive, whole=True)
            except BodyTooLarge:
                flag.count_unassigned(413)
                await self._too_large(send, request_id, [])
                return
            except ClientGone:
                return
            facts.json = json_body = JsonBody(body)  # type: ignore[arg-type]
            if flag.models is not None:
                flag = router.match(scope["path"], host, scope["method"], json_body.model())
                if flag is None:
                    await _error(send, 404, "no_route", json_body.no_model_reason(), request_id)
                    return
        assignment = flag.assigner.assign(
            flag.assigner.unit_from(facts),
            facts,
            weight=flag.weight,
            canary_open=flag.canary_open,
            rand=self._rand,
        )
        arm = flag.arms[assignment.variant]
        if declared_too_large:
            arm.meters.count(413)
            extra = _variant_headers(arm, request_id, assignment)
            await self._too_large(send, request_id, extra)
            return
        json = facts.json
        await self._forward(scope, receive, send, flag, arm, assignment, request_id, body, json)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        flag: FlagRuntime,
        arm: Arm,
        assignment: Assignment,
        request_id: bytes,
        body: object,
        json: JsonBody | None,
    ) -> None:
        if body is _UNREAD:
            try:
                body = await self._read_body(receive)
            except BodyTooLarge:
                arm.meters.count(413)
                extra = _variant_headers(arm, request_id, assignment)
                await self._too_large(send, request_id, extra)
                return
            except ClientGone:
                return
        request = ProxiedRequest(
            scope,
            receive,
            send,
            flag,
            assignment,
            request_id,
            body,  # type: ignore[arg-type]
            json,
        )
        if flag.shadows and self.mirror is not None:
            request.pairing = self.mirror.begin(
                flag, request.method, request.target, request.headers, request.body
            )
        # A client that leaves must stop its upstream request, whether we wait for the answer
        # or relay it. Only receive() tells, so a watcher task cancels this task when it says
        # the client left. Most exchanges are over before the watcher would be worth its
        # task, so it starts only once the exchange has taken WATCH_AFTER_S (up to half as
        # long again: `Deadlines`). (A streamed request body reads receive() itself.)
        task = asyncio.current_task()
        watch_after = self._watch_after
        arm_watcher = (
            None
            if isinstance(body, _StreamedBody) or task is None
            else watch_after.start(request, task)
        )
        try:
            await self._attempt(request, arm)
        except asyncio.CancelledError:
            if not request.client_gone or task is None:
                raise
            task.uncancel()  # ours, not a shutdown's: the request simply ends here
        finally:
            request.finished = True
            if arm_watcher is not None:
                watch_after.stop(request, arm_watcher)
            if request.watcher is not None:
                request.watcher.cancel()
            if request.pairing is not None:
                request.pairing.done(request.outcome)

    async def _attempt(
        self, request: ProxiedRequest, arm: Arm, *, fallback_from: Arm | None = None
    ) -> None:
        """Send to `arm` and answer the client; a failed canary may fall back to stable once."""
        started = time.perf_counter()
        try:
            body = request.body if arm.model is None else request.body_for(arm)
            response = await arm.client.send(
                request.method, arm.origin, request.target, request.headers, body
            )
        except asyncio.CancelledError:
            if request.client_gone:
                self._record_left_waiting(request, arm, started)
            raise
        except (UpstreamError, BodyTooLarge, ClientGone) as exc:
            streamed = request.body
            if isinstance(streamed, _StreamedBody) and streamed.ended is not None:
                # The streamed request body, not the upstream, failed (the client library may
                # wrap what it raised); the upstream connection was closed mid-body.
                if streamed.ended is BodyTooLarge:
                    arm.meters.count(413)
                    await self._too_large(request.send, request.request_id, request.extra(arm))
                return
            if not isinstance(exc, UpstreamError):
                raise
            if isinstance(exc, UnsendableRequest):
                arm.meters.count(400)  # the request's fault, not the upstream's: no guard
                await _error(
                    request.send,
                    400,
                    "bad_request",
                    str(exc),
                    request.request_id,
                    request.extra(arm),
                )
                return
            status = exc.status
            self._record(request, arm, status, started, exc.kind)
            if fallback_from is None and _falls_back(request.flag, arm, request.body):
                await self._attempt(request, request.flag.stable, fallback_from=arm)
                return
            await _error(
                request.send,
                status,
                exc.kind,
                _upstream_failed(arm, exc),
                request.request_id,
                request.extra(arm),
            )
            return
        if (
            response.status >= 500
            and fallback_from is None
            and _falls_back(request.flag, arm, request.body)
        ):
            await response.aclose()
            self._record(request, arm, response.status, started, None)
            await self._attempt(request, request.flag.stable, fallback_from=arm)
            return
        await self._respond(request, arm, response, started)

    async def _respond(
        self, request: ProxiedRequest, arm: Arm, response: UpstreamResponse, started: float
    ) -> None:
        status = response.status
        failure = None
        capture = request.capture()
        stream = None
        try:
            out_headers, event_stream = response_headers(response.headers)
            if event_stream:
                stream = StreamWatch(started)  # an event stream: relayed and watched (sse.py)
            out_headers.extend(request.extra(arm))
            body = response.complete_body()
            if body is not None:
                if capture is not None:
                    capture.append(body)
                if stream is not None:
                    stream.feed(body, time.perf_counter())
            respond = request.respond_whole
            if (
                body is None
                or respond is None
                or not respond(request.send, status, out_headers, body)
            ):
                start = {"type": "http.response.start", "status": status, "headers": out_headers}
                await request.send(start)
                if body is not None:
                    await request.send({"type": "http.response.body", "body": body})
                elif stream is None:
                    await _relay(response.chunks(), request.send, capture)
                else:
                    await self._relay_events(request, response, stream, capture)
        except UpstreamError as exc:
            failure = mid_body(exc)
            if stream is not None:
                stream.cut = True
        except asyncio.CancelledError:
            if request.client_gone:
                # An SDK hangs up on the error event it reads: what the answer showed by then
                # is the variant's outcome all the same.
                if stream is not None:
                    stream.client_left = True
                self._record(request, arm, status, started, None, capture, stream, left=True)
            raise
        finally:
            await response.aclose()
        self._record(request, arm, status, started, failure, capture, stream)
        if failure is not None:
            abort_client(request.send, request.abort_response)

    async def _relay_events(
        self,
        request: ProxiedRequest,
        response: UpstreamResponse,
        stream: StreamWatch,
        capture: _Capture | None,
    ) -> None:
        """An event stream's body: straight to the client's connection where the server
        offers a chunk writer, pushed by the upstream client where it can push (sse.py)."""
        writer_for = request.chunk_writer
        write = writer_for(request.send) if writer_for is not None else None
        push = getattr(response, "push_chunks", None) if write is not None else None
        await relay_events(
            response.chunks(),
            request.send,
            stream,
            time.perf_counter,
            capture,
            write=write,
            push=push,
        )

    async def _too_large(
        self, send: Send, request_id: bytes, extra: list[tuple[bytes, bytes]]
    ) -> None:
        message = f"request body over the limit of {self._max_body} bytes"
        await _error(send, 413, "too_large", message, request_id, extra)

    def _record(
        self,
        request: ProxiedRequest,
        arm: Arm,
        status: int,
        started: float,
        failure: str | None,
        captured: list[bytes] | None = None,
        stream: StreamWatch | None = None,
        *,
        left: bool = False,
    ) -> None:
        """Count an answer for its variant and show it to the guard; `left`: its client went
        away before it ended, and only a failure it had already shown is recorded."""
        elapsed = time.perf_counter() - started
        flag = request.flag
        guard = flag.guard
        if stream is not None:
            stream.finish()
            expect_done = flag.errors is not None and flag.errors.stream_aborted
            failure = stream.failure(expect_done=expect_done) or failure
        kind = None
        if left:
            if guard is not None:
                kind = guard.policy.kind_of(status, failure, elapsed, stream)
            if kind is None and not (stream is not None and stream.error_event):
                # Of an answer its client left, only a failure it had already shown and that
                # no rest of it could undo is known (an error event, or a kind its guard
                # counts: an error status, a first event later than `ttft_over` or none by
                # then, a wait longer than `latency_over`). Recording any other as a success
                # or as cut would tilt the counts and the guard either way.
                return
        meters = arm.meters
        meters.count(status)
        meters.duration.observe(elapsed)
        if stream is not None:
            meters.stream(stream.ttft_s, stream.gaps, stream.completion_tokens)
        if failure is not None:
            meters.error(failure)
        elif status >= 500:
            meters.error("status_5xx")
        arm.served += 1
        # An answer its client left is evidence of a failure only (an error event the guard
        # does not list leaves it undecided).
        if guard is not None and (arm is flag.canary or (guard.relative and arm is flag.stable)):
            if not left:
                kind = guard.policy.kind_of(status, failure, elapsed, stream)
            if kind is not None or not left:
                _show_guard(flag, guard, arm, kind)
        if request.pairing is not None and not left:  # a cut-short answer pairs with nothing
            body = b"".join(captured) if captured else b""
            request.outcome = Outcome(arm.name, status, failure, elapsed * 1000.0, body, stream)

    def _record_left_waiting(self, request: ProxiedRequest, arm: Arm, started: float) -> None:
        """The client left before the upstream's answer began. A wait already longer than
        the guard's `latency_over` is the variant's failure however the answer would have
        ended, and the guard counts it; of a shorter wait nothing is known, and nothing is
        recorded (no status either way, so the request counters are left alone)."""
        flag = request.flag
        guard = flag.guard
        if guard is None:
            return
        over = guard.policy.latency_over_s
        if over is not None and time.perf_counter() - started > over:
            _show_guard(flag, guard, arm, "latency_over")

    async def _read_body(
        self, receive: Receive, *, whole: bool = False
    ) -> bytes | _StreamedBody | None:
        """The request body; beyond the buffer limit a `_StreamedBody`, unless `whole` asks
        for all of it (up to `max_body_bytes`) in memory."""
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if len(chunk) > self._max_body:
                raise BodyTooLarge
            return chunk or None
        chunks, size = [chunk], len(chunk)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_body:
                raise BodyTooLarge
            if not message.get("more_body", False):
                return b"".join(chunks)
            if size > self._buffer_limit and not whole:
                return _StreamedBody(chunks, size, receive, self._max_body)


class _StreamedBody:
    """A request body too large to buffer: what was read so far, then the rest as it arrives."""

    def __init__(self, head: list[bytes], size: int, receive: Receive, limit: int) -> None:
        self._head, self._size, self._receive, self._limit = head, size, receive, limit
        # Why the body ended early (BodyTooLarge or ClientGone), else None. The exception
        # raised into the client library ends its request without the body's end, and the
        # library drops that connection: the upstream never sees a complete request.
        self.ended: type[Exception] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._head:
            yield chunk
        self._head = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.ended = ClientGone
                raise ClientGone
            chunk = message.get("body", b"")
            self._size += len(chunk)
            if self._size > self._limit:
                self.ended = BodyTooLarge
                raise BodyTooLarge
            yield chunk
            if not message.get("more_body", False):
                return


async def _relay(chunks: AsyncIterator[bytes], send: Send, capture: _Capture | None = None) -> None:
    """Stream the upstream body to the client, one chunk behind so the last send ends it.

    `capture` keeps the first bytes of the body (up to its limit) for a shadow comparison.
    """
    pending: bytes | None = None
    async for chunk in chunks:
        if capture is not None:
            capture.append(chunk)
        if pending is not None:
            await send({"type": "http.response.body", "body": pending, "more_body": True})
        pending = chunk
    await send({"type": "http.response.body", "body": pending or b"", "more_body": False})


def mid_body(exc: UpstreamError) -> str:
    """The error kind of an upstream failure after the response head went to the client.

    The status line is out, so the answer can no longer become a 502, and
    `on_canary_error: fallback` cannot apply: the request is an error (`MID_BODY`, in the
    metrics and for the guard), and the client's connection is aborted (`abort_client`)."""
    log.debug("upstream failed after the response head: %s", exc)
    return MID_BODY


def abort_client(send: Send, abort: AbortResponse | None) -> None:
    """Make the client see a failed transfer, never a clean short body: reset its connection
    where the server offers it (`abort`, the scope's `ABORT_RESPONSE`), else raise
    `ResponseAborted` so the ASGI server closes it mid-response (a Content-Length not met, or a
    chunked body without its last chunk)."""
    if abort is None or not abort(send):
        raise ResponseAborted("the upstream failed after the response head was sent")


def _show_guard(flag: FlagRuntime, guard: CanaryGuard, arm: Arm, kind: str | None) -> None:
    """Show one answer of `arm` to the guard, failed when `kind` names its failure: every
    canary answer, and in relative mode every stable one (the other arm of the comparison)."""
    if arm is flag.canary:
        guard.observe(kind is not None, kind)
    elif guard.relative and arm is flag.stable:
        guard.observe_stable(kind is not None)


def _watch_client(request: ProxiedRequest, task: asyncio.Task[Any]) -> None:
    """Cancel the exchange's task if the client disconnects before the exchange is over.

    uvicorn's receive() also returns once the response is complete; `request.finished` tells
    the two apart, and is set before the task could be cancelled for it.
    """
    if request.finished:
        return
    watcher = request.watcher = asyncio.ensure_future(request.receive())

    def on_message(done: asyncio.Future[Message]) -> None:
        if request.finished or done.cancelled():
            return
        if done.exception() is None and done.result().get("type") == "http.disconnect":
            request.client_gone = True
            task.cancel()

    watcher.add_done_callback(on_message)


def _upstream_failed(arm: Arm, exc: UpstreamError) -> str:
    """What the client is told: which variant failed and how, never the upstream's address."""
    log.debug("variant %s: %s", arm.name, exc)
    if isinstance(exc, UpstreamTimeout):
        return f"the model server for variant {arm.name} did not answer in time"
    if exc.kind == "bad_response":
        return f"the model server for variant {arm.name} sent an answer that is not valid HTTP"
    return f"the model server for variant {arm.name} refused the connection or failed"


def _falls_back(flag: FlagRuntime, arm: Arm, body: object) -> bool:
    """`on_canary_error: fallback` retries a failed canary request once on stable, when the
    body can be sent again (it was buffered, not streamed)."""
    return flag.fallback and arm is flag.canary and not isinstance(body, _StreamedBody)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _valid_request_id(value: bytes) -> bool:
    """Kept only if it is short printable ASCII: it is echoed into headers and logs."""
    return 0 < len(value) <= 200 and all(33 <= c < 127 and c not in b'",;\\' for c in value)


def _request_host(headers: list[tuple[bytes, bytes]]) -> str | None:
    raw = _header(headers, b"host")
    if raw is None:
        return None
    host = raw.decode("latin-1").lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def _head_problem(headers: list[tuple[bytes, bytes]]) -> tuple[int, str, str] | None:
    """A request head too big to forward, or with two Host headers (which one routes?)."""
    size, hosts = 0, 0
    for name, value in headers:
        size += len(name) + len(value) + 4
        hosts += name == b"host"
    if size > MAX_HEADER_BYTES:
        message = f"request headers over the limit of {MAX_HEADER_BYTES} bytes"
        return 431, "headers_too_large", message
    if hosts > 1:
        return 400, "bad_request", "more than one Host header"
    return None


def _path_problem(scope: Scope) -> str | None:
    """Dot segments and encoded separators could make a route see one path and the
    upstream another; such paths are refused rather than normalised. They are looked for
    once more after a second decoding (`%252e`), for upstreams that decode twice."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    if not raw.startswith(b"/"):
        return "the request target must be a path starting with '/'"
    # find(), not `in`: CPython's `bytes in bytes` first tries the operand as an int and
    # formats a TypeError it then discards (bench/RESULTS.md has the cost).
    if raw.find(b".") < 0 and raw.find(b"%") < 0 and raw.find(b"\\") < 0:
        return None
    decoded: str = scope["path"]
    twice = unquote(decoded) if "%" in decoded else decoded
    for form in (raw.decode("latin-1"), decoded):
        lowered = form.lower()
        if "%2f" in lowered or "%5c" in lowered or "\\" in form or "%00" in lowered:
            return "encoded slashes, backslashes and NUL are not allowed in the path"
    for form in (decoded, twice):
        # `..;` is `..` to servlet containers (a `;` starts path parameters there).
        if any(s.split(";", 1)[0] in (".", "..") for s in form.split("/")):
            return "dot segments (. and ..) are not allowed in the path"
    return None


def _target(scope: Scope) -> str:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope["query_string"]
    target = raw.decode("latin-1")
    return f"{target}?{query.decode('latin-1')}" if query else target


def _forwarded_headers(scope: Scope, request_id: bytes) -> list[tuple[str, str]]:
    client = scope.get("client")
    return forwarded_request_headers(
        scope["headers"],
        client_ip=client[0] if client else "unknown",
        scheme=scope.get("scheme", "http"),
        request_id=request_id.decode("latin-1"),
    )


def _variant_headers(
    arm: Arm, request_id: bytes, assignment: Assignment
) -> list[tuple[bytes, bytes]]:
    extra = [(b"x-gateway-variant", arm.header_value), (b"x-request-id", request_id)]
    if assignment.issue_cookie is not None:
        cookie = f"{COOKIE_NAME}={assignment.issue_cookie}; Path=/; HttpOnly; SameSite=Lax"
        extra.append((b"set-cookie", cookie.encode("latin-1")))
    return extra


async def _error(
    send: Send,
    status: int,
    error: str,
    message: str,
    request_id: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = orjson.dumps({"error": error, "message": message, "request_id": request_id.decode()})
    headers = [_JSON, (b"content-length", str(len(body)).encode()), (b"x-request-id", request_id)]
    if extra:
        headers.extend(h for h in extra if h[0] != b"x-request-id")
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
