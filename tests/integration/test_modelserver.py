"""The bundled model server, run as a real `gateway model-server` subprocess and driven by httpx."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from conftest import Server, running

from gateway.demo.modelserver import CHUNK_BYTES, score_of

GATEWAY = Path(sys.executable).with_name("gateway")


def model_server(*args: str) -> Callable[[int], list[str]]:
    return lambda port: [str(GATEWAY), "model-server", "--port", str(port), *args]


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- fixtures --------------------------------------------------------------------------------

# /_bytes/0 never fails and draws nothing from the error stream: polling it keeps the failure
# pattern of a seeded server independent of how long it took to start.
READY = "/_bytes/0"


def ready(port: int) -> str:
    return f"http://127.0.0.1:{port}{READY}"


@pytest.fixture(scope="module")
def primary() -> Iterator[Server]:
    with running(model_server("--name", "v1", "--seed", "1"), ready=ready) as server:
        yield server


@pytest.fixture(scope="module")
def replica() -> Iterator[Server]:
    with running(model_server("--name", "v1", "--seed", "1"), ready=ready) as server:
        yield server


@pytest.fixture(scope="module")
def shadow() -> Iterator[Server]:
    args = ("--name", "v3", "--seed", "2", "--score-offset", "0.1")
    with running(model_server(*args), ready=ready) as server:
        yield server


@pytest.fixture(scope="module")
def access_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("modelserver") / "access.jsonl"


@pytest.fixture(scope="module")
def logged(access_log: Path) -> Iterator[Server]:
    args = ("--name", "logged", "--access-log", str(access_log))
    with running(model_server(*args), ready=ready) as server:
        yield server


def log_records(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def scores(server: Server, bodies: Sequence[bytes]) -> list[float]:
    with httpx.Client(base_url=server.url) as client:
        return [client.post("/v1/predict", content=body).json()["score"] for body in bodies]


# --- scores ----------------------------------------------------------------------------------


def test_post_answers_model_and_score(primary: Server) -> None:
    response = httpx.post(f"{primary.url}/v1/predict", content=b'{"text": "good"}')

    assert response.status_code == 200
    assert response.headers["x-model"] == "v1"
    assert response.json() == {"model": "v1", "score": score_of(b'{"text": "good"}', seed=1)}


def test_same_body_and_seed_give_the_same_score_across_requests_and_processes(
    primary: Server, replica: Server
) -> None:
    bodies = [b"a", b"b" * 10_000, b""]

    first, again, other_process = (
        scores(primary, bodies),
        scores(primary, bodies),
        scores(replica, bodies),
    )

    assert first == again == other_process


def test_a_body_streamed_in_chunks_scores_like_the_whole_body(primary: Server) -> None:
    body = bytes(range(256)) * 20_000  # 5 MB, several receive() messages

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start : start + 100_000]

    streamed = httpx.post(f"{primary.url}/", content=chunks()).json()["score"]

    assert streamed == score_of(body, seed=1)


def test_different_bodies_give_different_scores(primary: Server) -> None:
    bodies = [f'{{"id": {i}}}'.encode() for i in range(200)]

    assert len(set(scores(primary, bodies))) == len(bodies)


def test_shadow_with_offset_and_other_seed_differs_by_the_offset_with_known_spread(
    primary: Server, shadow: Server
) -> None:
    bodies = [f'{{"text": "review {i}"}}'.encode() for i in range(600)]

    d = np.array(scores(shadow, bodies)) - np.array(scores(primary, bodies))

    # d = 0.1 + (noise_b - noise_a): two independent U(-0.1, 0.1), var = 2 * 0.2**2 / 12.
    assert abs(d.mean() - 0.1) < 0.01
    assert d.var(ddof=1) == pytest.approx(2 * 0.2**2 / 12, rel=0.2)
    assert np.all(np.abs(d - 0.1) <= 0.2)


# --- errors ----------------------------------------------------------------------------------


def test_error_rate_half_fails_about_half_the_requests() -> None:
    args = ("--name", "flaky", "--seed", "7", "--error-rate", "0.5")
    with running(model_server(*args), ready=ready) as server, httpx.Client() as client:
        responses = [client.post(f"{server.url}/v1/predict", content=b"x") for _ in range(400)]

    failed = [r for r in responses if r.status_code == 500]
    assert 0.4 * 400 <= len(failed) <= 0.6 * 400
    assert {r.status_code for r in responses} == {200, 500}
    assert failed[0].json() == {"model": "flaky", "error": "injected"}
    assert all(r.headers["x-model"] == "flaky" for r in responses)


def test_out_of_range_error_rate_is_refused() -> None:
    result = subprocess.run(
        [str(GATEWAY), "model-server", "--port", "1", "--name", "x", "--error-rate", "1.5"],
        capture_output=True,
        timeout=30,
    )

    assert result.returncode != 0
    assert b"error-rate" in result.stdout + result.stderr


# --- echo ------------------------------------------------------------------------------------


def test_get_echoes_method_path_query_and_headers(primary: Server) -> None:
    headers = [("X-User-Id", "alice"), ("X-Repeated", "one"), ("x-repeated", "two")]

    response = httpx.get(f"{primary.url}/v1/items?q=1&r=two", headers=headers)

    echo = response.json()
    assert response.headers["x-model"] == "v1"
    assert (echo["model"], echo["method"], echo["path"]) == ("v1", "GET", "/v1/items")
    assert echo["query"] == "q=1&r=two"
    assert echo["headers"]["x-user-id"] == "alice"
    assert echo["headers"]["x-repeated"] == "one, two"
    assert echo["headers"]["host"] == f"127.0.0.1:{primary.port}"


def test_other_methods_echo_and_read_the_whole_body(primary: Server) -> None:
    response = httpx.put(f"{primary.url}/v1/items/7", content=b"z" * 3_000_000)

    assert response.json()["method"] == "PUT"
    assert response.json()["body_bytes"] == 3_000_000


def test_head_answers_like_get_without_a_body(primary: Server) -> None:
    get = httpx.get(f"{primary.url}/v1/items", headers={"x-a": "1"})
    head = httpx.head(f"{primary.url}/v1/items", headers={"x-a": "1"})

    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["x-model"] == "v1"
    # The same echo document, whose "method" is one letter longer.
    assert int(head.headers["content-length"]) == int(get.headers["content-length"]) + 1


# --- test hooks ------------------------------------------------------------------------------


def test_bytes_hook_streams_exactly_n_bytes(primary: Server) -> None:
    size = 3 * CHUNK_BYTES + 123
    received = 0
    with httpx.stream("GET", f"{primary.url}/_bytes/{size}") as response:
        for chunk in response.iter_raw():
            received += len(chunk)

    assert response.status_code == 200
    assert response.headers["content-length"] == str(size)
    assert response.headers["x-model"] == "v1"
    assert received == size


def test_bytes_hook_rejects_a_missing_count(primary: Server) -> None:
    assert httpx.get(f"{primary.url}/_bytes/lots").status_code == 400


def test_stall_hook_never_answers(primary: Server) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{primary.url}/_stall", timeout=httpx.Timeout(5.0, read=0.3))


def test_slow_stream_logs_how_many_chunks_went_out_before_the_client_left(
    logged: Server, access_log: Path
) -> None:
    received = 0
    with httpx.stream("GET", f"{logged.url}/_slow_stream/100") as response:
        for chunk in response.iter_raw():
            received += len(chunk)
            if received >= 2 * CHUNK_BYTES:
                break

    def aborted() -> list[dict[str, object]]:
        return [r for r in log_records(access_log) if r.get("event") == "stream_aborted"]

    assert wait_for(lambda: bool(aborted()))
    (record,) = aborted()
    assert isinstance(record["sent"], int)
    assert 2 <= record["sent"] < 100
    assert record["model"] == "logged"


# --- access log ------------------------------------------------------------------------------


def test_access_log_gets_one_line_per_request(logged: Server, access_log: Path) -> None:
    httpx.get(f"{logged.url}/v1/first")
    httpx.post(f"{logged.url}/v1/second", content=b"{}")

    def mine() -> list[dict[str, object]]:
        return [r for r in log_records(access_log) if r.get("path") in ("/v1/first", "/v1/second")]

    assert wait_for(lambda: len(mine()) == 2)
    first, second = mine()
    assert {k: first[k] for k in ("method", "path", "status", "model")} == {
        "method": "GET",
        "path": "/v1/first",
        "status": 200,
        "model": "logged",
    }
    assert (second["method"], second["status"]) == ("POST", 200)
    assert isinstance(first["ts"], float)
    assert isinstance(second["ts"], float)
    assert first["ts"] <= second["ts"]
