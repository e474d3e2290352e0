"""Load-balancing weights from health: faster, more reliable, higher throughput weigh more."""

from __future__ import annotations

import pytest

from switchyard.router.weights import LATENCY_OFFSET_MS, compute_weights, weight_key
from switchyard.v1 import health_pb2


def entry(
    provider: str,
    model: str = "",
    *,
    latency: float = 1_000.0,
    error_rate: float = 0.0,
    tps: float = 0.0,
    samples: int = 100,
    breaker: int = health_pb2.BREAKER_STATE_CLOSED,
) -> health_pb2.ModelHealth:
    return health_pb2.ModelHealth(
        provider=provider,
        model=model,
        ewma_latency_ms=latency,
        error_rate=error_rate,
        output_tokens_per_second=tps,
        samples=samples,
        breaker=breaker,
    )


def test_weight_key_is_provider_then_model_id() -> None:
    assert weight_key("groq", "meta/llama") == "groq/meta/llama"


def test_faster_weighs_more_and_measured_entries_average_one() -> None:
    weights = compute_weights(
        [entry("a", "x/fast", latency=500), entry("b", "x/slow", latency=1_500)], floor=0.0
    )
    ratio = (1_500 + LATENCY_OFFSET_MS) / (500 + LATENCY_OFFSET_MS)
    assert weights["a/x/fast"] == pytest.approx(ratio * weights["b/x/slow"])
    assert (weights["a/x/fast"] + weights["b/x/slow"]) / 2 == pytest.approx(1.0)


def test_a_few_milliseconds_between_fast_providers_barely_move_the_shares() -> None:
    weights = compute_weights([entry("a", "x/3ms", latency=3), entry("b", "x/9ms", latency=9)], floor=0.0)
    assert 1.0 < weights["a/x/3ms"] / weights["b/x/9ms"] < 1.15


def test_errors_lower_the_weight_quadratically() -> None:
    weights = compute_weights([entry("a", "x/ok"), entry("b", "x/flaky", error_rate=0.5)], floor=0.0)
    assert weights["b/x/flaky"] == pytest.approx(weights["a/x/ok"] * 0.25)


def test_throughput_raises_the_weight_by_its_square_root() -> None:
    weights = compute_weights([entry("a", "x/quick", tps=200), entry("b", "x/slowtok", tps=50)], floor=0.0)
    assert weights["a/x/quick"] == pytest.approx(2 * weights["b/x/slowtok"])


def test_no_entry_falls_below_the_floor_of_the_best() -> None:
    weights = compute_weights(
        [entry("a", "x/fast", latency=10), entry("b", "x/awful", latency=100_000)], floor=0.1
    )
    assert weights["b/x/awful"] == pytest.approx(0.1 * weights["a/x/fast"])


def test_unmeasured_open_and_provider_entries() -> None:
    weights = compute_weights(
        [
            entry("a", "x/new", samples=0),
            entry("b", "x/open", breaker=health_pb2.BREAKER_STATE_OPEN),
            entry("c"),  # provider-level: no weight
            entry("d", "x/measured", latency=800),
        ],
        floor=0.05,
    )
    assert weights == {"a/x/new": 1.0, "b/x/open": 0.0, "d/x/measured": pytest.approx(1.0)}


def test_entries_failing_every_time_share_equally() -> None:
    weights = compute_weights(
        [entry("a", "x/one", error_rate=1.0), entry("b", "x/two", error_rate=1.0)], floor=0.0
    )
    assert weights == {"a/x/one": 1.0, "b/x/two": 1.0}
