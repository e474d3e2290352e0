"""Routing snapshots from the catalog and health, and their compiled routing tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import timestamp_pb2

from switchyard.common.catalog import parse_catalog
from switchyard.router.rules import rules_from_json
from switchyard.router.table import (
    BREAKER_CLOSED,
    BREAKER_HALF_OPEN,
    BREAKER_OPEN,
    DEFAULT_CONFIDENCE,
    PROVIDER_DOWN,
    RoutingTable,
    build_snapshot,
)
from switchyard.v1 import common_pb2, health_pb2, router_pb2

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)

CATALOG = parse_catalog(
    """
providers:
  alpha: {vendor: openai, base_url: "http://127.0.0.1:1/v1", region: us, adapter: "127.0.0.1:7001"}
  beta: {vendor: anthropic, base_url: "http://127.0.0.1:2/v1", region: eu, free_tier: true}
models:
  - {id: alpha/small, provider: alpha, upstream_model: small-1, category: small, quality: 70,
     context_window: 8000, max_output_tokens: 1000, prices: {input: "0.2", output: "0.4"},
     capabilities: [streaming, tools, json_mode], aliases: [fast],
     price_changes: [{effective_from: 2030-01-01, prices: {input: "0.1", output: "0.3"}},
                     {effective_from: 2031-01-01, prices: {input: "0.05", output: "0.1"}}]}
  - {id: alpha/think, provider: alpha, upstream_model: think-1, category: reasoning, quality: 90,
     context_window: 200000, max_output_tokens: 50000, prices: {input: "1", output: "4", reasoning: "6"},
     capabilities: [reasoning, tools]}
  - {id: beta/large, provider: beta, upstream_model: large-2, category: large, quality: 88,
     context_window: 100000, max_output_tokens: 4000, prices: {input: "3", output: "15"},
     capabilities: [vision, json_schema], fallbacks: [alpha/small, alpha/think]}
  - {id: beta/mid, provider: beta, upstream_model: mid-2, category: large, quality: 80,
     context_window: 100000, max_output_tokens: 4000, prices: {input: "1", output: "5"}}
aliases: {fast: beta/mid, best: beta/large}
default_model: best
tenants:
  acme:
    tier: pro
    allowed_models: [alpha/small, beta/large]
    routing_rules:
      - {name: pin-small, when: {tier: [expert]}, then: {pin: alpha/small}}
  open: {}
"""
)


def stamp(at: datetime) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(at)
    return value


def test_snapshot_models_carry_current_prices_capabilities_and_provider_facts() -> None:
    snapshot = build_snapshot(CATALOG, version=7, now=NOW)
    assert snapshot.version == 7 and snapshot.generated_at.ToDatetime(tzinfo=UTC) == NOW
    models = {m.id: m for m in snapshot.models}
    small = models["alpha/small"]
    # The 2030-01-01 change is in effect on NOW; the 2031 one is not yet.
    assert (small.pricing.input_micros_per_million, small.pricing.output_micros_per_million) == (
        100_000,
        300_000,
    )
    assert small.pricing.effective_from.ToDatetime(tzinfo=UTC) == datetime(2030, 1, 1, tzinfo=UTC)
    assert list(small.capabilities) == [
        common_pb2.CAPABILITY_STREAMING,
        common_pb2.CAPABILITY_TOOLS,
        common_pb2.CAPABILITY_JSON_MODE,
    ]
    assert (small.category, small.quality_score, small.vendor, small.region, small.free_tier) == (
        common_pb2.MODEL_CATEGORY_SMALL,
        70,
        "openai",
        "us",
        False,
    )
    large = models["beta/large"]
    assert (large.region, large.free_tier, large.category) == ("eu", True, common_pb2.MODEL_CATEGORY_LARGE)
    assert models["alpha/think"].pricing.reasoning_micros_per_million == 6_000_000
    later = {m.id: m for m in build_snapshot(CATALOG, version=8, now=datetime(2031, 2, 1, tzinfo=UTC)).models}
    assert later["alpha/small"].pricing.input_micros_per_million == 50_000


def test_snapshot_providers_aliases_fallbacks_tenants_and_default() -> None:
    snapshot = build_snapshot(CATALOG, version=1, now=NOW)
    providers = {p.name: p for p in snapshot.providers}
    assert providers["alpha"] == router_pb2.ProviderInfo(
        name="alpha", vendor="openai", region="us", free_tier=False, adapter_target="127.0.0.1:7001"
    )
    assert providers["beta"].free_tier
    # Catalog aliases first, then each model's own.
    assert [(a.alias, list(a.models)) for a in snapshot.aliases] == [
        ("fast", ["beta/mid"]),
        ("best", ["beta/large"]),
        ("fast", ["alpha/small"]),
    ]
    assert [(f.model, list(f.fallbacks)) for f in snapshot.fallbacks] == [
        ("beta/large", ["alpha/small", "alpha/think"])
    ]
    tenants = {t.tenant_id: t for t in snapshot.tenants}
    assert tenants["acme"].tier == "pro" and list(tenants["acme"].allowed_models) == [
        "alpha/small",
        "beta/large",
    ]
    assert rules_from_json(tenants["acme"].rules_json)[0]["then"] == {"pin": "alpha/small"}
    assert tenants["open"].rules_json == "" and tenants["open"].tier == "free"
    assert snapshot.default_model == "beta/large"  # the alias `best`, resolved
    assert snapshot.settings == router_pb2.RoutingSettings(
        max_candidates=3, equal_score_band=0.1, weight_floor=0.05, headroom_reserve=0.02
    )


def test_snapshot_weights_default_to_one_or_follow_health() -> None:
    plain = build_snapshot(CATALOG, version=1, now=NOW)
    assert dict(plain.weights) == {
        "alpha/alpha/small": 1.0,
        "alpha/alpha/think": 1.0,
        "beta/beta/large": 1.0,
        "beta/beta/mid": 1.0,
    }
    health = [
        health_pb2.ModelHealth(provider="alpha", model="alpha/small", samples=10, ewma_latency_ms=100),
        health_pb2.ModelHealth(provider="beta", model="beta/mid", samples=10, ewma_latency_ms=300),
    ]
    measured = build_snapshot(CATALOG, version=2, health=health, now=NOW)
    # 1 / (latency + 50 ms): 1/150 against 1/350, normalised to average 1.
    assert measured.weights["alpha/alpha/small"] == pytest.approx(1.4)
    assert measured.weights["beta/beta/mid"] == pytest.approx(0.6)
    assert measured.weights["beta/beta/large"] == 1.0  # no data
    given = build_snapshot(CATALOG, version=3, health=health, weights={"beta/beta/mid": 4.0}, now=NOW)
    assert given.weights["beta/beta/mid"] == 4.0 and given.weights["alpha/alpha/small"] == 1.0


def test_snapshot_latency_models_come_from_fitted_health_entries() -> None:
    health = [
        health_pb2.ModelHealth(
            provider="alpha",
            model="alpha/small",
            latency_base_ms=120,
            latency_ms_per_input_token=0.01,
            latency_ms_per_output_token=2.5,
            latency_fit_samples=40,
            latency_prediction_error=0.1,
        ),
        health_pb2.ModelHealth(provider="beta", model="beta/mid", ewma_latency_ms=900, samples=5),
    ]
    snapshot = build_snapshot(CATALOG, version=1, health=health, now=NOW)
    assert list(snapshot.health) == health
    assert list(snapshot.latency_models) == [
        router_pb2.LatencyModel(
            model="alpha/small",
            provider="alpha",
            base_ms=120,
            ms_per_input_token=0.01,
            ms_per_output_token=2.5,
            samples=40,
            prediction_error=0.1,
        )
    ]


def test_table_resolves_names_like_the_catalog_and_groups_by_category() -> None:
    table = RoutingTable.from_catalog(CATALOG, version=5)
    assert table.version == 5
    assert table.resolve("alpha/small") is table.models["alpha/small"]
    # A catalog alias wins over a model's own alias of the same name, as in Catalog.resolve.
    assert table.resolve("fast") is table.models["beta/mid"] and CATALOG.resolve("fast") is not None
    assert CATALOG.resolve("fast").id == "beta/mid"  # type: ignore[union-attr]
    assert table.resolve("best") is table.models["beta/large"]
    assert table.resolve("nope") is None
    assert [r.id for r in table.by_category["large"]] == ["beta/large", "beta/mid"]
    assert [r.id for r in table.by_category["small"]] == ["alpha/small"]
    assert table.default_model is table.models["beta/large"]
    assert (table.max_candidates, table.equal_score_band, table.weight_floor, table.headroom_reserve) == (
        3,
        0.1,
        0.05,
        0.02,
    )


def test_model_routes_hold_prices_capabilities_and_defaults() -> None:
    table = RoutingTable.from_catalog(CATALOG)
    think = table.models["alpha/think"]
    assert (think.input_price, think.output_price, think.blended2) == (1_000_000, 6_000_000, 5_000_000)
    assert think.expected_output == 1_024 and think.default_output == 1_024
    assert think.capabilities == {common_pb2.CAPABILITY_REASONING, common_pb2.CAPABILITY_TOOLS}
    large = table.models["beta/large"]
    assert (large.vendor, large.upstream_model, large.region, large.free_tier) == (
        "anthropic",
        "large-2",
        "eu",
        True,
    )
    assert large.fallbacks == ("alpha/small", "alpha/think")
    assert (large.lat_base, large.confidence, large.breaker, large.gated) == (
        2_000.0,
        DEFAULT_CONFIDENCE,
        BREAKER_CLOSED,
        False,
    )
    assert table.models["alpha/small"].lat_base == 800.0 and think.lat_base == 8_000.0
    assert large.expected_output == 256 and large.key == "beta/beta/large" and large.weight == 1.0


def test_breakers_from_model_and_provider_entries() -> None:
    health = [
        health_pb2.ModelHealth(
            provider="alpha", model="alpha/small", breaker=health_pb2.BREAKER_STATE_OPEN, reason="5 failures"
        ),
        health_pb2.ModelHealth(
            provider="alpha",
            model="alpha/think",
            breaker=health_pb2.BREAKER_STATE_HALF_OPEN,
            half_open_trials=2,
        ),
        health_pb2.ModelHealth(provider="beta", status=health_pb2.HEALTH_STATUS_DOWN, reason="probe failed"),
    ]
    table = RoutingTable.from_catalog(CATALOG, health=health)
    small, think = table.models["alpha/small"], table.models["alpha/think"]
    assert (small.breaker, small.breaker_detail, small.gated) == (
        BREAKER_OPEN,
        "breaker open (5 failures)",
        True,
    )
    assert (think.breaker, think.half_open_trials, think.trial_key) == (
        BREAKER_HALF_OPEN,
        2,
        "alpha/alpha/think",
    )
    assert think.health_score == 0.5
    for model in ("beta/large", "beta/mid"):
        route = table.models[model]
        assert (route.breaker, route.breaker_detail) == (PROVIDER_DOWN, "provider beta down: probe failed")


def test_health_score_falls_with_status_and_error_rate() -> None:
    health = [
        health_pb2.ModelHealth(
            provider="alpha", model="alpha/small", status=health_pb2.HEALTH_STATUS_HEALTHY
        ),
        health_pb2.ModelHealth(
            provider="beta", model="beta/mid", status=health_pb2.HEALTH_STATUS_DEGRADED, error_rate=0.2
        ),
        health_pb2.ModelHealth(provider="beta", model="beta/large", error_rate=0.5),
    ]
    table = RoutingTable.from_catalog(CATALOG, health=health)
    assert table.models["alpha/small"].health_score == 1.0
    assert table.models["beta/mid"].health_score == pytest.approx(0.4)
    assert table.models["beta/large"].health_score == pytest.approx(0.5)
    assert table.models["alpha/think"].health_score == 1.0  # no data


def test_headroom_blocks_until_reset_and_keeps_token_headroom() -> None:
    observed = NOW.timestamp()
    low_requests = common_pb2.RateLimitHeadroom(
        limit_requests=1_000,
        remaining_requests=20,  # at the 2 % reserve
        requests_reset_at=stamp(NOW + timedelta(seconds=30)),
        limit_tokens=100_000,
        remaining_tokens=5_000,
        tokens_reset_at=stamp(NOW + timedelta(seconds=10)),
        observed_at=stamp(NOW),
    )
    retry = common_pb2.RateLimitHeadroom(retry_after_ms=4_000, observed_at=stamp(NOW))
    no_reset = common_pb2.RateLimitHeadroom(remaining_requests=0, observed_at=stamp(NOW))
    health = [
        health_pb2.ModelHealth(provider="alpha", model="alpha/small", headroom=low_requests),
        health_pb2.ModelHealth(provider="alpha", model="alpha/think", headroom=retry),
        health_pb2.ModelHealth(provider="beta", headroom=no_reset),
    ]
    table = RoutingTable.from_catalog(CATALOG, health=health)
    small = table.models["alpha/small"]
    assert small.blocked_until == pytest.approx(observed + 30)
    assert small.blocked_detail == "rate-limit headroom: 20 of 1000 requests left until reset"
    assert (small.tokens_remaining, small.tokens_until) == (5_000, pytest.approx(observed + 10))
    think = table.models["alpha/think"]
    assert think.blocked_until == pytest.approx(observed + 4)
    assert think.blocked_detail == "rate-limited: retry after 4000 ms"
    # No reset time given: the observation holds for DEFAULT_RESET_S (60 s).
    assert table.models["beta/mid"].blocked_until == pytest.approx(observed + 60)
    assert all(table.models[m].gated for m in ("alpha/small", "alpha/think", "beta/mid"))


def test_latency_prediction_sources_and_confidence() -> None:
    health = [
        health_pb2.ModelHealth(
            provider="alpha",
            model="alpha/small",
            latency_base_ms=100,
            latency_ms_per_input_token=0.5,
            latency_ms_per_output_token=3,
            latency_fit_samples=25,
            latency_prediction_error=0.2,
        ),
        health_pb2.ModelHealth(provider="beta", model="beta/mid", ewma_latency_ms=900, samples=100),
    ]
    table = RoutingTable.from_catalog(CATALOG, health=health)
    small = table.models["alpha/small"]
    assert (small.lat_base, small.lat_in, small.lat_out) == (100, 0.5, 3)
    assert small.confidence == pytest.approx(0.5 * 0.8)  # half of 50 samples, 20 % error
    mid = table.models["beta/mid"]
    assert (mid.lat_base, mid.lat_in, mid.lat_out, mid.confidence) == (900, 0.0, 0.0, pytest.approx(0.6))
    assert table.models["beta/large"].confidence == DEFAULT_CONFIDENCE


def test_tenants_compile_rules_tier_and_allowed_models() -> None:
    table = RoutingTable.from_catalog(CATALOG)
    acme = table.tenants["acme"]
    assert (acme.tier, acme.allowed) == ("pro", frozenset({"alpha/small", "beta/large"}))
    assert [rule.label for rule in acme.rules] == ["rule 1 (pin-small)"]
    assert acme.rules[0].actions.pin == "alpha/small"
    assert table.tenants["open"].allowed is None and table.tenants["open"].rules == ()


def test_from_snapshot_of_a_serialised_snapshot_compiles_the_same_table() -> None:
    health = [
        health_pb2.ModelHealth(provider="alpha", model="alpha/small", ewma_latency_ms=300, samples=30),
        health_pb2.ModelHealth(provider="beta", model="beta/mid", breaker=health_pb2.BREAKER_STATE_OPEN),
    ]
    direct = RoutingTable.from_catalog(CATALOG, version=9, health=health)
    wire = build_snapshot(CATALOG, version=9, health=health).SerializeToString()
    received = RoutingTable.from_snapshot(router_pb2.RoutingSnapshot.FromString(wire))
    assert received.version == direct.version
    assert dict(received.models) == dict(direct.models)
    assert {k: v.id for k, v in received.names.items()} == {k: v.id for k, v in direct.names.items()}
    assert dict(received.weights) == dict(direct.weights)


def test_an_empty_snapshot_plans_with_default_settings() -> None:
    table = RoutingTable.from_snapshot(router_pb2.RoutingSnapshot(version=3))
    assert (table.version, table.max_candidates, table.equal_score_band) == (3, 3, 0.1)
    assert table.models == {} and table.default_model is None
