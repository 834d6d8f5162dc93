"""The gateway's exception tree, in one place.

    GatewayError
    ├── InvalidDocument          a flag document or settings file broke the contract (422 / exit 1)
    ├── ConflictError            compare-and-set lost: the stored version moved on (409)
    ├── PreconditionRequired     a replace or delete came without If-Match (428)
    ├── NotFoundError            no such flag (404)
    ├── IllegalTransition        an operator action the rollout's state does not allow (409)
    ├── StoreUnavailable         the flag store cannot take writes right now (503)
    └── UpstreamError            a model server did not answer properly
        ├── UpstreamConnectError     refused, unreachable, reset before a response (502)
        ├── UpstreamBadResponse      an answer that is not HTTP, or breaks its own framing (502)
        ├── UpstreamTimeout          no response within the configured timeout (504)
        └── UnsendableRequest        the client library cannot put this request on the wire (400)

Third-party exceptions (aiohttp, httpx, redis) are translated into these at the adapter that
owns the library, re-raised `from exc`; only the outermost handlers turn them into HTTP answers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem in a document, addressed by its key path (`flags[0].guard.e1`)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class InvalidDocument(GatewayError):
    """A document was rejected as a whole; `errors` lists every problem found."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


class ConflictError(GatewayError):
    """The document's version is not the one the writer based its change on."""

    def __init__(self, key: str, expected: int | None, actual: int | None) -> None:
        self.key, self.expected, self.actual = key, expected, actual
        super().__init__(
            f"flag {key!r} is at version {actual}, not {expected}: re-read it and retry"
        )


class PreconditionRequired(GatewayError):
    """A write that would replace or delete a document came without If-Match."""


class NotFoundError(GatewayError):
    """No flag with that key."""


class IllegalTransition(GatewayError):
    """An operator action the flag's rollout cannot take now (pausing a paused rollout, an
    unknown action, acting on a flag without a canary); nothing was written."""


class StoreUnavailable(GatewayError):
    """The flag store cannot accept writes now (Redis away); nothing was written."""


class UpstreamError(GatewayError):
    """A model server failed to answer; `kind` is the metrics label, `status` the answer."""

    kind = "error"
    status = 502


class UpstreamConnectError(UpstreamError):
    kind = "connect_error"


class UpstreamBadResponse(UpstreamError):
    kind = "bad_response"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"
    status = 504


class UnsendableRequest(UpstreamError):
    """The request cannot be written to the upstream as it came (a header the client library
    refuses): the client is told 400, and the upstream is not at fault."""

    kind = "bad_request"
    status = 400
