"""Which requests the cache may answer, and the keys their answers are stored under."""

from __future__ import annotations

import pytest

from switchyard.cache.keys import AUTO, cache_decision, cache_key
from switchyard.v1 import common_pb2


def chat(text: str = "What is the capital of France?", **sampling: float) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model="openai/gpt-4o-mini", request_id="r-1")
    request.messages.add(role=common_pb2.ROLE_USER).parts.add(text=text)
    for name, value in sampling.items():
        setattr(request.sampling, name, value)
    return request


def test_deterministic_requests_are_cached_and_others_are_not() -> None:
    assert cache_decision(chat(temperature=0.0), 0.0).lookup
    assert cache_decision(chat(temperature=0.0), 0.0).store
    warm = cache_decision(chat(temperature=0.7), 0.0)
    assert (warm.lookup, warm.store, warm.reason) == (False, False, "temperature above 0")
    assert cache_decision(chat(temperature=0.7), 0.8).lookup
    unset = cache_decision(chat(), 0.5)
    assert not unset.lookup and "no temperature" in unset.reason


@pytest.mark.parametrize(
    ("mode", "lookup", "store"),
    [
        (common_pb2.CACHE_MODE_USE, True, True),
        (common_pb2.CACHE_MODE_SKIP, False, False),
        (common_pb2.CACHE_MODE_REFRESH, False, True),
    ],
)
def test_the_callers_policy_wins_over_the_sampling(mode: int, lookup: bool, store: bool) -> None:
    request = chat(temperature=1.0)
    request.cache.mode = mode  # type: ignore[assignment]
    decision = cache_decision(request, 0.0)
    assert (decision.lookup, decision.store) == (lookup, store)


def test_the_key_ignores_what_does_not_change_the_answer() -> None:
    first = chat(temperature=0.0)
    second = chat(temperature=0.0)
    second.request_id = "r-2"
    second.metadata.end_user = "someone-else"
    second.metadata.tags["team"] = "search"
    second.cache.mode = common_pb2.CACHE_MODE_USE
    second.cache.ttl_seconds = 60
    assert cache_key("acme", first, "openai/gpt-4o-mini") == cache_key("acme", second, "openai/gpt-4o-mini")
    assert second.request_id == "r-2"  # the request itself is untouched


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.messages[0].parts[0].__setattr__("text", "What is the capital of Spain?"),
        lambda r: r.sampling.__setattr__("max_output_tokens", 5),
        lambda r: r.sampling.__setattr__("temperature", 0.1),
        lambda r: r.sampling.stop_sequences.append("."),
        lambda r: r.response_format.__setattr__("type", common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
        lambda r: r.tools.add(name="lookup"),
        lambda r: r.messages.add(role=common_pb2.ROLE_SYSTEM).parts.add(text="Answer in French."),
    ],
)
def test_the_key_changes_with_what_shapes_the_answer(change: object) -> None:
    base = chat(temperature=0.0)
    changed = chat(temperature=0.0)
    change(changed)  # type: ignore[operator]
    assert cache_key("acme", base, "m") != cache_key("acme", changed, "m")


def test_tenants_and_models_never_share_a_key_and_lead_it() -> None:
    request = chat(temperature=0.0)
    key = cache_key("acme", request, "openai/gpt-4o-mini")
    assert key.startswith("acme/openai%2Fgpt-4o-mini/")
    assert cache_key("other", request, "openai/gpt-4o-mini") != key
    assert cache_key("acme", request, "openai/gpt-4.1-mini") != key
    # A tenant id cannot forge another tenant's prefix.
    assert not cache_key("acme/openai", request, "x").startswith("acme/")


def test_auto_keys_include_the_routing_hints() -> None:
    cheap = chat(temperature=0.0)
    cheap.routing.preference = common_pb2.ROUTING_PREFERENCE_COST
    fast = chat(temperature=0.0)
    fast.routing.preference = common_pb2.ROUTING_PREFERENCE_LATENCY
    assert cache_key("acme", cheap, AUTO) != cache_key("acme", fast, AUTO)
    # For a named model the routing hints do not change the answer.
    assert cache_key("acme", cheap, "m") == cache_key("acme", fast, "m")
