"""Planning: the requested model (by id, alias or default), then its fallback chain."""

from __future__ import annotations

import grpc
import pytest

from switchyard.common.catalog import parse_catalog
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.router.plan import plan_route

CATALOG = parse_catalog(
    """
providers:
  a: {vendor: openai, base_url: "http://127.0.0.1:1/v1"}
  b: {vendor: openai_compatible, base_url: "http://127.0.0.1:2/v1"}
models:
  - {id: a/one, provider: a, upstream_model: one, context_window: 1000, max_output_tokens: 100,
     prices: {input: "1", output: "2"}, aliases: [first], fallbacks: [b/two, a/three, b/four]}
  - {id: b/two, provider: b, upstream_model: two-v2, context_window: 1000, max_output_tokens: 100,
     prices: {input: "1", output: "2"}, fallbacks: [a/one]}
  - {id: a/three, provider: a, upstream_model: three, context_window: 1000, max_output_tokens: 100,
     prices: {input: "1", output: "2"}}
  - {id: b/four, provider: b, upstream_model: four, context_window: 1000, max_output_tokens: 100,
     prices: {input: "1", output: "2"}}
default_model: b/two
"""
)


def ids(plan: list) -> list[str]:  # type: ignore[type-arg]
    return [c.model.id for c in plan]


def test_requested_model_then_fallbacks_capped_at_three() -> None:
    plan = plan_route(CATALOG, "a/one")
    assert ids(plan) == ["a/one", "b/two", "a/three"]
    assert [c.reason for c in plan] == ["requested model", "fallback of a/one", "fallback of a/one"]
    assert [(c.provider, c.vendor) for c in plan] == [
        ("a", "openai"),
        ("b", "openai_compatible"),
        ("a", "openai"),
    ]


def test_alias_and_default_and_auto() -> None:
    assert plan_route(CATALOG, "first")[0].reason == "alias 'first'"
    assert ids(plan_route(CATALOG, "")) == ["b/two", "a/one"]
    assert plan_route(CATALOG, "auto")[0].reason == "auto: default model"


def test_fallback_cycle_does_not_repeat_a_model() -> None:
    assert ids(plan_route(CATALOG, "b/two", max_candidates=5)) == ["b/two", "a/one"]


def test_allowed_models_filter_the_plan() -> None:
    assert ids(plan_route(CATALOG, "a/one", allowed_models=frozenset({"a/three", "a/one"}))) == [
        "a/one",
        "a/three",
    ]


def test_unknown_model_is_invalid_argument() -> None:
    with pytest.raises(SwitchyardError) as caught:
        plan_route(CATALOG, "z/unknown")
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT and caught.value.metadata["field"] == "model"


def test_nothing_allowed_is_no_route() -> None:
    with pytest.raises(SwitchyardError) as caught:
        plan_route(CATALOG, "a/three", allowed_models=frozenset({"b/four"}))
    assert caught.value.reason is Reason.NO_ROUTE
