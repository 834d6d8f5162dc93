"""The request path: route, assign, forward, stream back, record (DESIGN 1, 3, 10).

Plain ASGI on purpose: Starlette's Request/Response cost ~90 us of a ~460 us proxied request
(DESIGN 1). Everything here reads the replica's in-memory snapshot; nothing waits on Redis.
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

from gateway.core.assignment import COOKIE_NAME, Assignment
from gateway.deadlines import Deadlines
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.headers import forwarded_request_headers, response_headers
from gateway.http_protocol import RESPOND_WHOLE
from gateway.runtime import Arm, FlagRuntime, Router
from gateway.settings import Settings
from gateway.shadow import Mirror, Outcome, Pairing
from gateway.upstream import UpstreamResponse

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
RespondWhole = Callable[[Send, int, list[tuple[bytes, bytes]], bytes], bool]
_NONE: dict[str, Any] = {}

# httptools sets no limit on the request head, so the gateway refuses big ones itself (431)
# rather than forward them: nginx allows 32 KiB by default, Node 16 KiB.
MAX_HEADER_BYTES = 64 * 1024
# How long an exchange runs before a task watches for its client leaving (see `_forward`).
WATCH_AFTER_S = 0.02
_JSON = (b"content-type", b"application/json")


class _Capture(list[bytes]):
    """The first bytes of a response body, kept up to `limit` for a shadow metric."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.size, self.limit = 0, limit

    def append(self, chunk: bytes) -> None:
        if self.size <= self.limit:
            super().append(chunk)
            self.size += len(chunk)


class _Exchange:
    """One proxied request: what every attempt (primary, fallback) and the mirror share."""

    __slots__ = (
        "assignment", "body", "client_gone", "finished", "flag", "headers", "method", "outcome",
        "pairing", "receive", "request_id", "respond_whole", "send", "target", "watcher",
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
    ) -> None:
        self.receive, self.send, self.flag = receive, send, flag
        # The server's one-call answer (gateway/http_protocol.py), where it offers one.
        self.respond_whole: RespondWhole | None = scope.get("extensions", _NONE).get(RESPOND_WHOLE)
        self.assignment, self.request_id, self.body = assignment, request_id, body
        self.method: str = scope["method"]
        self.target = _target(scope)
        self.headers = _forwarded_headers(scope, request_id)
        self.pairing: Pairing | None = None
        self.outcome: Outcome | None = None
        self.client_gone = False
        self.finished = False
        self.watcher: asyncio.Future[Message] | None = None

    def extra(self, arm: Arm) -> list[tuple[bytes, bytes]]:
        return _variant_headers(arm, self.request_id, self.assignment)

    def capture(self) -> _Capture | None:
        pairing = self.pairing
        return _Capture(pairing.capture_limit) if pairing and pairing.wants_body else None


class BodyTooLarge(Exception):
    """The request body grew past `max_body_bytes` while streaming."""


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class _Facts:
    """Request attributes for targeting rules, read lazily from the ASGI scope."""

    __slots__ = ("_cookies", "_headers", "_query", "_query_string")

    def __init__(self, headers: list[tuple[bytes, bytes]], query_string: bytes) -> None:
        self._headers = headers
        self._query_string = query_string
        self._cookies: dict[str, str] | None = None
        self._query: dict[str, str] | None = None

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
        self._watch_after: Deadlines[_Exchange, asyncio.Task[Any]] = Deadlines(
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
        if length is not None and (not length.isdigit() or int(length) > self._max_body):
            status, msg = (
                (400, "invalid Content-Length")
                if not length.isdigit()
                else (413, f"request body over the limit of {self._max_body} bytes")
            )
            await _error(
                send, status, "bad_request" if status == 400 else "too_large", msg, request_id
            )
            return
        facts = _Facts(headers, scope["query_string"])
        assignment = flag.assigner.assign(
            flag.assigner.unit_from(facts),
            facts,
            weight=flag.weight,
            canary_open=flag.canary_open,
            rand=self._rand,
        )
        arm = flag.arms[assignment.variant]
        await self._forward(scope, receive, send, flag, arm, assignment, request_id)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        flag: FlagRuntime,
        arm: Arm,
        assignment: Assignment,
        request_id: bytes,
    ) -> None:
        try:
            body = await self._read_body(receive)
        except BodyTooLarge:
            await self._too_large(send, request_id, _variant_headers(arm, request_id, assignment))
            return
        except ClientGone:
            return
        x = _Exchange(scope, receive, send, flag, assignment, request_id, body)
        if flag.shadows and self.mirror is not None:
            x.pairing = self.mirror.begin(flag, x.method, x.target, x.headers, body)
        # A client that leaves must stop its upstream request, whether we wait for the answer
        # or relay it. Only receive() tells, so a watcher task cancels this task when it says
        # the client left. Most exchanges are over before the watcher would be worth its
        # task, so it starts only once the exchange has taken WATCH_AFTER_S (up to half as
        # long again: `Deadlines`). (A streamed request body reads receive() itself.)
        task = asyncio.current_task()
        watch_after = self._watch_after
        arm_watcher = (
            None if isinstance(body, _StreamedBody) or task is None else watch_after.start(x, task)
        )
        try:
            await self._attempt(x, arm)
        except asyncio.CancelledError:
            if not x.client_gone or task is None:
                raise
            task.uncancel()  # ours, not a shutdown's: the request simply ends here
        finally:
            x.finished = True
            if arm_watcher is not None:
                watch_after.stop(x, arm_watcher)
            if x.watcher is not None:
                x.watcher.cancel()
            if x.pairing is not None:
                x.pairing.done(x.outcome)

    async def _attempt(self, x: _Exchange, arm: Arm, *, fallback_from: Arm | None = None) -> None:
        """Send to `arm` and answer the client; a failed canary may fall back to stable once."""
        started = time.perf_counter()
        try:
            response = await arm.client.send(x.method, arm.origin, x.target, x.headers, x.body)
        except UpstreamError as exc:
            if isinstance(x.body, _StreamedBody) and x.body.too_large:
                await self._too_large(x.send, x.request_id, x.extra(arm))
                return
            status = 504 if isinstance(exc, UpstreamTimeout) else 502
            self._record(x, arm, status, started, exc.kind)
            if fallback_from is None and _falls_back(x.flag, arm, x.body):
                await self._attempt(x, x.flag.stable, fallback_from=arm)
                return
            await _error(
                x.send, status, exc.kind, _upstream_failed(arm, exc), x.request_id, x.extra(arm)
            )
            return
        if response.status >= 500 and fallback_from is None and _falls_back(x.flag, arm, x.body):
            await response.aclose()
            self._record(x, arm, response.status, started, None)
            await self._attempt(x, x.flag.stable, fallback_from=arm)
            return
        await self._respond(x, arm, response, started)

    async def _respond(
        self, x: _Exchange, arm: Arm, response: UpstreamResponse, started: float
    ) -> None:
        status = response.status
        failure = None
        capture = x.capture()
        try:
            out_headers = response_headers(response.headers)
            out_headers.extend(x.extra(arm))
            body = response.complete_body()
            if body is not None and capture is not None:
                capture.append(body)
            respond = x.respond_whole
            if body is None or respond is None or not respond(x.send, status, out_headers, body):
                start = {"type": "http.response.start", "status": status, "headers": out_headers}
                await x.send(start)
                if body is None:
                    await _relay(response.chunks(), x.send, capture)
                else:
                    await x.send({"type": "http.response.body", "body": body})
        except UpstreamError as exc:
            failure = exc.kind  # failed mid-stream: the status line is already sent
        finally:
            await response.aclose()
        self._record(x, arm, status, started, failure, capture)

    async def _too_large(
        self, send: Send, request_id: bytes, extra: list[tuple[bytes, bytes]]
    ) -> None:
        message = f"request body over the limit of {self._max_body} bytes"
        await _error(send, 413, "too_large", message, request_id, extra)

    def _record(
        self,
        x: _Exchange,
        arm: Arm,
        status: int,
        started: float,
        failure: str | None,
        captured: list[bytes] | None = None,
    ) -> None:
        elapsed = time.perf_counter() - started
        meters = arm.meters
        meters.count(status)
        meters.duration.observe(elapsed)
        if failure is not None:
            meters.error(failure)
        elif status >= 500:
            meters.error("status_5xx")
        arm.served += 1
        flag = x.flag
        guard = flag.guard
        if guard is not None:
            if arm is flag.canary:
                guard.observe(guard.policy.is_error(status, failure, elapsed))
            elif guard.relative and arm is flag.stable:
                guard.observe_stable(guard.policy.is_error(status, failure, elapsed))
        if x.pairing is not None:
            body = b"".join(captured) if captured else b""
            x.outcome = Outcome(arm.name, status, failure, elapsed * 1000.0, body)

    async def _read_body(self, receive: Receive) -> bytes | _StreamedBody | None:
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
            if size > self._buffer_limit:
                return _StreamedBody(chunks, size, receive, self._max_body)


class _StreamedBody:
    """A request body too large to buffer: what was read so far, then the rest as it arrives."""

    def __init__(self, head: list[bytes], size: int, receive: Receive, limit: int) -> None:
        self._head, self._size, self._receive, self._limit = head, size, receive, limit
        self.too_large = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._head:
            yield chunk
        self._head = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            self._size += len(chunk)
            if self._size > self._limit:
                self.too_large = True
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


def _watch_client(x: _Exchange, task: asyncio.Task[Any]) -> None:
    """Cancel the exchange's task if the client disconnects before the exchange is over.

    uvicorn's receive() also returns once the response is complete; `x.finished` tells the two
    apart, and is set before the task could be cancelled for it.
    """
    if x.finished:
        return
    watcher = x.watcher = asyncio.ensure_future(x.receive())

    def on_message(done: asyncio.Future[Message]) -> None:
        if x.finished or done.cancelled():
            return
        if done.exception() is None and done.result().get("type") == "http.disconnect":
            x.client_gone = True
            task.cancel()

    watcher.add_done_callback(on_message)


def _upstream_failed(arm: Arm, exc: UpstreamError) -> str:
    """What the client is told: which variant failed and how, never the upstream's address."""
    log.debug("variant %s: %s", arm.name, exc)
    if isinstance(exc, UpstreamTimeout):
        return f"the model server for variant {arm.name} did not answer in time"
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
    # formats a TypeError it then discards, ~1,900 instructions each (callgrind).
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
