"""The LLM parts of the flag document and of routing: `route.model`, `unit.from: body`, an arm's
`model`, the stream guard kinds and shadow metrics; route overlap with models; the router's
model matching; assignment from a JSON pointer (DESIGN 2, 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.control.runtime import ANY_MODEL, Router
from gateway.core.assignment import Assigner, StaticFacts, bucket, canary_threshold
from gateway.core.flags import parse_flag, parse_flag_set
from gateway.errors import InvalidDocument


def flag(key: str = "chat", **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "key": key,
        "route": {"path_prefix": "/v1"},
        "stable": {"name": "v1", "upstream": "http://127.0.0.1:9001"},
    }
    doc.update(fields)
    return doc


def problems(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidDocument) as caught:
        parse_flag_set(doc)
    return {e.path: e.message for e in caught.value.errors}


def test_route_model_takes_one_name_or_a_list() -> None:
    assert parse_flag(flag(route={"path_prefix": "/v1", "model": "llama"})).route.model == ["llama"]
    both = flag(route={"path_prefix": "/v1", "model": ["a", "b"]})
    assert parse_flag(both).route.model == ["a", "b"]
    assert parse_flag(flag()).route.model is None


def test_every_llm_field_problem_is_reported_at_once() -> None:
    doc = flag(
        route={"path_prefix": "/v1", "model": []},
        unit={"from": "body", "name": "user"},
        stable={"name": "v1", "upstream": "http://127.0.0.1:9001", "model": ""},
        guard={"errors": ["ttft_over:0", "ttft_under:5", "stream_broken"]},
        shadows=[{"name": "v3", "upstream": "http://127.0.0.1:9003", "metric": "len:score"}],
    )
    found = problems({"flags": [doc]})
    assert set(found) == {
        "flags[0].route.model",
        "flags[0].unit.name",
        "flags[0].stable.model",
        "flags[0].guard.errors[0]",
        "flags[0].guard.errors[1]",
        "flags[0].guard.errors[2]",
        "flags[0].shadows[0].metric",
    }, found
    assert "JSON pointer" in found["flags[0].unit.name"]
    assert "ttft_over:<ms>" in found["flags[0].guard.errors[2]"]


def test_two_ttft_thresholds_are_refused() -> None:
    found = problems({"flags": [flag(guard={"errors": ["ttft_over:100", "ttft_over:200"]})]})
    assert "at most one ttft_over" in found["flags[0].guard.errors"]


def test_the_stream_kinds_and_metrics_are_accepted() -> None:
    doc = flag(
        unit={"from": "body"},
        canary={"name": "v2", "upstream": "http://127.0.0.1:9002", "model": "llama-lora"},
        guard={"errors": ["status_5xx", "stream_aborted", "error_event", "ttft_over:500"]},
        shadows=[
            {"name": f"s{i}", "upstream": "http://127.0.0.1:9003", "metric": metric}
            for i, metric in enumerate(
                [
                    "ttft_ms",
                    "completion_tokens",
                    "stream_gap_p99_ms",
                    "len:json:/choices/0/message/content",
                ]
            )
        ],
    )
    parsed = parse_flag(doc)
    assert parsed.unit.name == "/user"  # the OpenAI API's end-user field by default
    assert parsed.canary is not None and parsed.canary.model == "llama-lora"
    assert parsed.guard.ttft_threshold_ms == 500.0


def routed(prefix: str, model: object = None, key: str = "a") -> dict[str, Any]:
    route: dict[str, Any] = {"path_prefix": prefix}
    if model is not None:
        route["model"] = model
    return flag(key, route=route)


@pytest.mark.parametrize(
    ("first", "second", "overlap"),
    [
        ("llama", "mistral", False),
        (["llama", "qwen"], ["mistral", "qwen"], True),
        ("llama", "llama", True),
        ("llama", None, True),  # a flag without a model takes every model: as with host
        (None, None, True),
    ],
)
def test_routes_on_one_prefix_overlap_unless_their_models_differ(
    first: object, second: object, overlap: bool
) -> None:
    doc = {"flags": [routed("/v1", first, "a"), routed("/v1/", second, "b")]}
    if overlap:
        assert "overlaps the route of flag 'a'" in problems(doc)["flags[1].route"]
    else:
        assert len(parse_flag_set(doc).flags) == 2


class _Flag:
    """What the router reads of a compiled flag."""

    def __init__(self, key: str, prefix: str, models: list[str] | None) -> None:
        self.key, self.prefix, self.host, self.methods = key, prefix, None, None
        self.models = frozenset(models) if models else None


def test_the_router_matches_the_body_model_and_falls_back_to_a_shorter_prefix() -> None:
    flags = [_Flag("llama", "/v1/chat", ["llama"]), _Flag("qwen", "/v1/chat", ["qwen"])]
    router = Router([*flags, _Flag("any", "/v1", None)])  # type: ignore[list-item]

    def key(model: object) -> str | None:
        found = router.match("/v1/chat/completions", None, "POST", model)
        return found.key if found is not None else None

    assert key(ANY_MODEL) == "llama"  # not read yet: the first candidate, asked again later
    assert key("llama") == "llama" and key("qwen") == "qwen"
    assert key("gpt-4") == "any" and key(None) == "any"
    assert Router(flags).match("/v1/chat", None, "POST", None) is None  # type: ignore[arg-type]


@given(st.text(min_size=1, max_size=40), st.floats(0.0, 1.0))
def test_the_unit_from_the_body_is_assigned_by_the_binding_formula(unit: str, w: float) -> None:
    doc = flag(
        unit={"from": "body", "name": "/metadata/user~1id"},
        canary={"name": "v2", "upstream": "http://127.0.0.1:9002"},
    )
    assigner = Assigner(parse_flag(doc))
    facts = StaticFacts(units={"/metadata/user~1id": unit})
    got = assigner.assign(assigner.unit_from(facts), facts, weight=w, canary_open=True, rand=None)  # type: ignore[arg-type]
    assert got.unit == unit
    assert got.variant == ("v2" if bucket("chat", unit) < canary_threshold(w) else "v1")


def test_the_llm_example_file_validates() -> None:
    path = Path(__file__).resolve().parents[2] / "config" / "llm-flags.yaml"
    flags = parse_flag_set(yaml.safe_load(path.read_text())).flags
    assert [f.route.model for f in flags] == [["llama"], ["support"]]
    assert all(f.unit.source == "body" and f.canary and f.canary.model for f in flags)
