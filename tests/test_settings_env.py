"""Settings from the environment: every key as `GATEWAY_` + path joined by `__`, command-line
flags over environment over file, and every mistake named by its variable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from gateway.errors import InvalidDocument
from gateway.settings import Settings, load_settings


def scalar_paths(model: type[BaseModel] = Settings, prefix: str = "") -> list[str]:
    """Every settings key that holds a value (not a section), as a dotted path."""
    paths = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            paths += scalar_paths(kind, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def env_name(path: str) -> str:
    return "GATEWAY_" + path.upper().replace(".", "__")


def value_at(settings: Settings, path: str) -> Any:
    node: Any = settings
    for part in path.split("."):
        node = getattr(node, part)
    return node


def test_every_key_can_come_from_the_environment() -> None:
    """Each key set alone from its variable, to a value that differs from its default."""
    defaults = Settings()
    for path in scalar_paths():
        if path == "admin.tokens":
            continue  # a list: its own format, below
        default = value_at(defaults, path)
        if path == "server.http":
            raw = expected = "stock"
        elif isinstance(default, bool):
            raw, expected = str(not default).lower(), not default
        elif isinstance(default, int):
            raw, expected = str(default + 1), default + 1
        elif isinstance(default, float):
            raw, expected = str(default * 2), default * 2
        elif path == "store.kind":
            raw, expected = "redis", "redis"
        elif path == "upstream.client":
            raw, expected = "httpx", "httpx"
        else:
            raw, expected = "/tmp/elsewhere", "/tmp/elsewhere"
        env = {env_name(path): raw}
        if path == "workers":
            env["GATEWAY_STORE__KIND"] = "redis"  # more than one worker needs a shared store
        got = value_at(load_settings(None, env=env), path)
        assert got == expected, (path, raw, got)
    assert len(scalar_paths()) > 15  # the walk found the nested keys


def test_tokens_and_empty_values() -> None:
    settings = load_settings(
        None,
        env={
            "GATEWAY_ADMIN__TOKENS": "ops:operator:secret-123456",
            "GATEWAY_STORE__FLAGS_FILE": "",
        },
    )
    assert [(t.name, t.role) for t in settings.admin.tokens] == [("ops", "operator")]
    assert settings.store.flags_file is None


@given(
    file=st.integers(1, 65535),
    env=st.integers(1, 65535) | st.none(),
    cli=st.integers(1, 65535) | st.none(),
)
def test_flags_beat_the_environment_which_beats_the_file(
    tmp_path_factory: pytest.TempPathFactory, file: int, env: int | None, cli: int | None
) -> None:
    path = tmp_path_factory.mktemp("settings") / "gateway.yaml"
    path.write_text(yaml.safe_dump({"upstream": {"max_connections": file}}))
    environ = {} if env is None else {"GATEWAY_UPSTREAM__MAX_CONNECTIONS": str(env)}
    got = load_settings(path, env=environ, overrides={"upstream.max_connections": cli})
    expected = cli if cli is not None else env if env is not None else file
    assert got.upstream.max_connections == expected


def test_every_mistake_is_named_by_its_variable(tmp_path: Path) -> None:
    with pytest.raises(InvalidDocument) as caught:
        load_settings(
            None,
            env={
                "GATEWAY_UPSTREAM__READ_TIMEOUT": "5",  # a typo: no such key
                "GATEWAY_NOPE__X": "1",
                "GATEWAY_TOKEN": "not a setting: the CLI's token",
                "GATEWAY_ADMIN_URL": "http://127.0.0.1:9090",
            },
        )
    assert sorted(str(e) for e in caught.value.errors) == [
        "GATEWAY_NOPE__X: no setting 'nope.x' (GATEWAY_ + path joined by __)",
        "GATEWAY_UPSTREAM__READ_TIMEOUT: no setting 'upstream.read_timeout' "
        "(GATEWAY_ + path joined by __)",
    ]
    with pytest.raises(InvalidDocument) as caught:
        load_settings(
            None,
            env={"GATEWAY_UPSTREAM__READ_TIMEOUT_S": "-1", "GATEWAY_LISTEN__PORT": "http"},
        )
    assert sorted(str(e) for e in caught.value.errors) == [
        "listen.port (from GATEWAY_LISTEN__PORT): Input should be a valid integer, unable to "
        "parse string as an integer",
        "upstream.read_timeout_s (from GATEWAY_UPSTREAM__READ_TIMEOUT_S): Input should be "
        "greater than 0",
    ]
