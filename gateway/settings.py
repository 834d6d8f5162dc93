"""Gateway settings: `config/gateway.yaml`, then environment, then command-line flags.

Every key is optional (DESIGN 8). `load_settings` validates everything once and raises
`InvalidDocument` listing every problem by key path, like the flag documents.

Every key can also come from the environment: `GATEWAY_` and the key's path in upper case,
joined by `__` (`GATEWAY_UPSTREAM__READ_TIMEOUT_S=5`, `GATEWAY_WORKERS=2`). Values are read as
the setting's type (numbers, `true`/`false`); an empty value means null where null is allowed.
A `GATEWAY_X__Y` that names no setting is an error, so a typo is never silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import FieldError, InvalidDocument

ENV_REDIS_URL = "GATEWAY_REDIS_URL"
ENV_ADMIN_TOKENS = "GATEWAY_ADMIN_TOKENS"
ENV_CONFIG = "GATEWAY_CONFIG"

ENV_PREFIX = "GATEWAY_"
ENV_SEPARATOR = "__"

M = TypeVar("M", bound=BaseModel)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)


class AdminToken(_Section):
    name: str = Field(min_length=1)
    role: Literal["viewer", "operator"]
    secret: str = Field(min_length=8, repr=False)


class Admin(_Section):
    host: str = "0.0.0.0"
    port: int = Field(9090, ge=0, le=65535)
    tokens: tuple[AdminToken, ...] = ()


class Store(_Section):
    kind: Literal["memory", "redis"] = "memory"
    flags_file: str | None = "config/flags.yaml"
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "gw"
    resync_interval_s: float = Field(5.0, gt=0)
    flush_interval_s: float = Field(0.05, gt=0)
    # The local snapshot (DESIGN 7); None: <state dir>/snapshot.json
    # (gateway.control.snapshot), "": none.
    snapshot_file: str | None = None


# httptools: HTTP/1.1 on asyncio with httptools' parser, public APIs only (the default: the
# least CPU a request, side by side; docs/fast-path.md); aiohttp-direct: aiohttp driven below
# ClientSession (gateway/dataplane/fast/), httptools where it cannot load; aiohttp: its
# ClientSession; httpx. HTTP/2 upstreams always use httpx.
ClientKind = Literal["aiohttp-direct", "httptools", "aiohttp", "httpx"]


class Upstream(_Section):
    client: ClientKind = "httptools"
    connect_timeout_s: float = Field(1.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(1000, ge=1)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=0)
    mirror_max_body_bytes: int = Field(1024 * 1024, ge=0)


class ShadowSettings(_Section):
    max_in_flight: int = Field(256, ge=1)
    pair_log: str | None = None


class Limits(_Section):
    """What the data port allows each connection (DESIGN 10); `max_connections` is per worker."""

    head_timeout_s: float = Field(10.0, gt=0)
    keepalive_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(10_000, ge=1)


class ServerSettings(_Section):
    """Which HTTP server serves the data port (gateway/dataplane/servers.py): `fast` is uvicorn
    with the gateway's own HTTP/1.1 protocol, `stock` uvicorn's own httptools protocol. `fast`
    falls back to `stock`, with one warning, on a uvicorn outside the versions tested."""

    http: Literal["fast", "stock"] = "fast"


class Settings(_Section):
    listen: Listen = Listen()
    admin: Admin = Admin()
    store: Store = Store()
    upstream: Upstream = Upstream()
    shadow: ShadowSettings = ShadowSettings()
    limits: Limits = Limits()
    server: ServerSettings = ServerSettings()
    workers: int = Field(1, ge=1)
    controller_interval_s: float = Field(0.1, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)


def parse_tokens(spec: str) -> tuple[AdminToken, ...]:
    """`name:role:secret[,name:role:secret...]` as in GATEWAY_ADMIN_TOKENS."""
    tokens = []
    for i, item in enumerate(p for p in spec.split(",") if p.strip()):
        parts = item.strip().split(":", 2)
        if len(parts) != 3:
            raise InvalidDocument(
                [FieldError(f"{ENV_ADMIN_TOKENS}[{i}]", "expected name:role:secret")]
            )
        name, role, secret = parts
        tokens.append({"name": name, "role": role, "secret": secret})
    return _validated(Admin, {"tokens": tokens}, ENV_ADMIN_TOKENS).tokens


def load_settings(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """File, then env, then `overrides` (dotted keys such as `listen.port`), validated once."""
    env = os.environ if env is None else env
    doc = _read_yaml(path or env.get(ENV_CONFIG))
    from_env, env_errors = _env_values(env)
    for dotted, value in from_env.items():
        _set(doc, dotted, value)
    if env.get(ENV_REDIS_URL):
        _set(doc, "store.kind", "redis")
        _set(doc, "store.url", env[ENV_REDIS_URL])
    settings_tokens = None
    if env.get(ENV_ADMIN_TOKENS):
        settings_tokens = parse_tokens(env[ENV_ADMIN_TOKENS])
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(doc, dotted, value)
    try:
        settings = _validated(Settings, doc, "")
    except InvalidDocument as exc:
        names = {dotted: name for name, dotted in _env_names(env).items()}
        raise InvalidDocument(
            env_errors
            + [
                FieldError(f"{e.path} (from {names[e.path]})", e.message) if e.path in names else e
                for e in exc.errors
            ]
        ) from exc
    if env_errors:
        raise InvalidDocument(env_errors)
    if settings_tokens is not None:
        settings = settings.model_copy(
            update={"admin": settings.admin.model_copy(update={"tokens": settings_tokens})}
        )
    check_consistency(settings)
    return settings


def _env_names(env: Mapping[str, str]) -> dict[str, str]:
    """`GATEWAY_A__B` -> `a.b` for every variable that names a settings path (or tries to)."""
    found = {}
    for name in env:
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if ENV_SEPARATOR in rest or rest.lower() in _scalar_fields(Settings):
            found[name] = ".".join(rest.lower().split(ENV_SEPARATOR))
    return found


def _scalar_fields(model: type[BaseModel]) -> set[str]:
    return {
        name
        for name, field in model.model_fields.items()
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
    }


def _env_values(env: Mapping[str, str]) -> tuple[dict[str, Any], list[FieldError]]:
    """Dotted settings paths and values from `GATEWAY_*` variables, and a problem for every
    variable that names no setting (kept apart, so that every problem is reported at once)."""
    values: dict[str, Any] = {}
    errors = []
    for name, dotted in _env_names(env).items():
        field = _field(Settings, dotted.split("."))
        if field is None:
            errors.append(FieldError(name, f"no setting {dotted!r} (GATEWAY_ + path joined by __)"))
            continue
        raw = env[name]
        if dotted == "admin.tokens":
            values[dotted] = [t.model_dump() for t in parse_tokens(raw)]
        elif raw == "" and _allows_none(field):
            values[dotted] = None
        else:
            values[dotted] = raw  # pydantic reads "5", "0.5", "true" as the field's type
    return values, errors


def _field(model: type[BaseModel], path: list[str]) -> Any:
    field = model.model_fields.get(path[0])
    if field is None:
        return None
    nested = field.annotation
    if len(path) == 1:
        return None if isinstance(nested, type) and issubclass(nested, BaseModel) else field
    if isinstance(nested, type) and issubclass(nested, BaseModel):
        return _field(nested, path[1:])
    return None


def _allows_none(field: Any) -> bool:
    return not field.is_required() and (field.default is None or "None" in str(field.annotation))


def check_consistency(settings: Settings) -> None:
    if settings.workers > 1 and settings.store.kind == "memory":
        raise InvalidDocument(
            [
                FieldError(
                    "workers",
                    f"{settings.workers} workers need a shared flag store: the memory store "
                    "lives in one process; use --redis-url (or store.kind: redis)",
                )
            ]
        )


def _read_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InvalidDocument([FieldError(str(path), f"cannot read: {exc.strerror}")]) from exc
    except yaml.YAMLError as exc:
        raise InvalidDocument([FieldError(str(path), f"not valid YAML: {exc}")]) from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InvalidDocument([FieldError(str(path), "expected a mapping of settings")])
    return loaded


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = doc
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def _validated(model: type[M], doc: object, prefix: str) -> M:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False):
            path = ".".join(str(p) for p in err["loc"])
            path = f"{prefix}.{path}" if prefix and path else (prefix or path or "$")
            message = str(err["msg"]).removeprefix("Value error, ")
            if message == "Extra inputs are not permitted":
                message = "unknown setting"
            errors.append(FieldError(path, message))
        raise InvalidDocument(errors) from exc
