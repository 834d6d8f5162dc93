"""The admin API fuzzed from its own OpenAPI description (schemathesis), on a real gateway.

Every operation in `/admin/openapi.json` gets generated requests, valid ones and invalid ones,
sent with an operator token to a real `gateway serve`. No answer may be a 5xx, and every answer
must match the description: a documented status, content type, headers and body schema.

Operations on one flag run twice: on a generated key (almost always a flag that does not
exist: 404, or a create through PUT) and on the key of a flag that does exist, so that the
status, the rollout actions, replace and delete are fuzzed past their 404. A fuzzed DELETE or
promote may remove or change that flag; it is put back before each example.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
import yaml
from conftest import GATEWAY_BIN, flag_doc, free_port, running
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from gateway.admin.openapi import openapi_document

OPERATOR = "fuzz-operator-secret-7c1d"
AUTH = {"Authorization": f"Bearer {OPERATOR}"}
EXISTING = "sentiment"
NOWHERE = "http://127.0.0.1:9"  # flags here serve no traffic
MAX_EXAMPLES = 50


@dataclass(frozen=True, slots=True)
class Admin:
    url: str
    flag: dict[str, Any]
    client: httpx.Client  # kept open: a new client costs ~60 ms (its TLS context)
    session: requests.Session  # the same for schemathesis's requests

    def ensure_flag(self) -> None:
        """Put the flag back as it was, whatever the last example did to it."""
        current = self.client.get(f"/admin/flags/{EXISTING}")
        if current.status_code == 200 and current.json()["document"] == self.flag:
            return
        headers = {"If-Match": current.headers["etag"]} if current.status_code == 200 else {}
        r = self.client.put(f"/admin/flags/{EXISTING}", json=self.flag, headers=headers)
        assert r.status_code in (200, 201), r.text


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    tmp: Path = tmp_path_factory.mktemp("admin-fuzz")
    flags = flag_doc(NOWHERE, NOWHERE, weight=0.1, hold="1h")
    flags_file, settings_file = tmp / "flags.yaml", tmp / "gateway.yaml"
    flags_file.write_text(yaml.safe_dump(flags))
    settings_file.write_text(yaml.safe_dump({"admin": {"host": "127.0.0.1"}}))
    admin_port = free_port()
    argv = [str(GATEWAY_BIN), "serve", "--config", str(settings_file), "--flags", str(flags_file)]
    argv += ["--host", "127.0.0.1", "--admin-port", str(admin_port)]
    with running(
        lambda p: [*argv, "--port", str(p)],
        ready=lambda _p: f"http://127.0.0.1:{admin_port}/readyz",
        env={"GATEWAY_ADMIN_TOKENS": f"fuzzer:operator:{OPERATOR}"},
    ) as gateway:
        url = f"http://127.0.0.1:{admin_port}"
        with (
            httpx.Client(base_url=url, headers=AUTH, timeout=10) as client,
            requests.Session() as session,
        ):
            stored = client.get(f"/admin/flags/{EXISTING}").json()["document"]
            yield Admin(url, stored, client, session)
        assert gateway.process.poll() is None, gateway.log()


def load(admin: Admin, path: str, method: str) -> Any:
    """The operation from the description the gateway serves, with its checks configured."""
    schema = schemathesis.openapi.from_url(f"{admin.url}/admin/openapi.json")
    if (path, method) == ("/admin/flags/{key}", "PUT"):
        # A schema-valid flag document may still break a rule JSON Schema cannot state (e0 < e1,
        # weights summing to at most 1, routes that overlap another flag's, a rule naming an
        # unknown variant...): 422 with the list of problems. And replacing a flag without
        # If-Match is 428 whatever the body.
        accepted = schema.config.checks.positive_data_acceptance
        accepted.expected_statuses = [*accepted.expected_statuses, "422", "428"]
    return schema[path][method]


# Read from the description the gateway serves, so that a new operation is fuzzed without
# touching this file.
OPERATIONS = [
    (path, method.upper())
    for path, item in openapi_document()["paths"].items()
    for method in item
    if method != "parameters"
]
ON_ONE_FLAG = [(path, method) for path, method in OPERATIONS if "{key}" in path]


def fuzz(admin: Admin, operation: Any, path_parameters: dict[str, str] | None = None) -> None:
    """Valid and invalid requests for `operation`; each answer checked against the description
    by every check schemathesis enables by default (no 5xx, status, content type, headers,
    body schema, invalid input refused, valid input accepted, ...)."""
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE, path_parameters=path_parameters),
        operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=path_parameters),
    )

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def run(case: Any) -> None:
        # A parameter whose value is null cannot be sent (requests drops it), so the request
        # sent would not be the invalid one generated.
        assume(
            not any(v is None for part in (case.query, case.headers) for v in (part or {}).values())
        )
        admin.ensure_flag()
        case.call_and_validate(base_url=admin.url, session=admin.session, headers=AUTH)

    run()


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_every_operation_answers_as_documented_and_never_5xx(
    admin: Admin, path: str, method: str
) -> None:
    fuzz(admin, load(admin, path, method))


@pytest.mark.parametrize(("path", "method"), ON_ONE_FLAG, ids=[f"{m} {p}" for p, m in ON_ONE_FLAG])
def test_operations_on_an_existing_flag_answer_as_documented(
    admin: Admin, path: str, method: str
) -> None:
    fuzz(admin, load(admin, path, method), {"key": EXISTING})
