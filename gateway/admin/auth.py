"""Who is calling the admin API: bearer tokens, their roles, and the refusals.

Tokens come from the settings (`admin.tokens` or GATEWAY_ADMIN_TOKENS), each a name, a role and
a secret. `viewer` may read (GET); `operator` may read and write. The API is never open: with no
token configured every guarded route refuses and says how to configure one.

Secrets are compared in constant time against *every* configured token (no early exit on the
first match), after hashing both sides to one length, so neither the position of the matching
token nor a secret's length shows in the response time. Only a token's name ever leaves this
module (audit, logs); the secret and the presented credential are never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.settings import ENV_ADMIN_TOKENS, AdminToken

Role = Literal["viewer", "operator"]
_RANK: dict[str, int] = {"viewer": 0, "operator": 1}
REALM = "gateway-admin"
HOW_TO_CONFIGURE = (
    f"set {ENV_ADMIN_TOKENS}=name:role:secret[,name:role:secret...] (role viewer or operator, "
    "secret at least 8 characters) or admin.tokens in the settings file, then restart"
)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the token's name and role, never its secret."""

    name: str
    role: Role

    def may(self, role: Role) -> bool:
        return _RANK[self.role] >= _RANK[role]


class AuthError(Exception):
    """A refused request: `status` 401 or 403, an error code and a message for the caller."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message
        super().__init__(message)

    @property
    def headers(self) -> dict[str, str]:
        if self.status != 401:
            return {}
        error = ', error="invalid_token"' if self.code == "invalid_token" else ""
        return {"WWW-Authenticate": f'Bearer realm="{REALM}"{error}'}


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class Authenticator:
    """Checks `Authorization: Bearer <secret>` against the configured tokens."""

    def __init__(self, tokens: Sequence[AdminToken]) -> None:
        self._tokens = [(_digest(t.secret), Principal(t.name, t.role)) for t in tokens]

    @property
    def configured(self) -> bool:
        return bool(self._tokens)

    def authorize(self, authorization: str | None, needs: Role) -> Principal:
        """The caller if it may act as `needs`, else AuthError (401 or 403)."""
        if not self._tokens:
            raise AuthError(
                403, "admin_disabled", f"no admin tokens are configured: {HOW_TO_CONFIGURE}"
            )
        principal = self._identify(_bearer(authorization))
        if not principal.may(needs):
            raise AuthError(
                403,
                "forbidden",
                f"token {principal.name!r} has role {principal.role}; this needs {needs}",
            )
        return principal

    def _identify(self, presented: str) -> Principal:
        candidate = _digest(presented)
        found: Principal | None = None
        for digest, principal in self._tokens:
            # Every token is compared, whatever matched before: constant time in the match.
            if hmac.compare_digest(digest, candidate):
                found = principal
        if found is None:
            raise AuthError(401, "invalid_token", "unknown or revoked admin token")
        return found


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AuthError(
            401, "unauthorized", "send Authorization: Bearer <token> (a configured admin token)"
        )
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise AuthError(401, "unauthorized", "the Authorization header must be: Bearer <token>")
    return credential.strip()
