"""Geography: latency measured per region flows from the health book, through the routing
snapshot, into the plans of an edge in that region. The health book, snapshot, table, planner
and route watcher are the real ones; only the outcomes are made up (and the book's clock)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import pytest

from switchyard.common.catalog import parse_catalog
from switchyard.edge.routes import RouteWatcher
from switchyard.health.book import HealthBook, HealthConfig
from switchyard.router.plan import Planner
from switchyard.router.table import CONFIDENT_SAMPLES, REGION_MIN_SAMPLES, RoutingTable, build_snapshot
from switchyard.v1 import common_pb2, health_pb2, router_pb2

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
URL = "http://127.0.0.1:9/v1"
LATENCY = common_pb2.ROUTING_PREFERENCE_LATENCY

# Three interchangeable models (same price, quality and catalog region): only latency sets them apart.
CATALOG = parse_catalog(
    f"""
providers:
  near: {{vendor: openai, base_url: "{URL}", region: us}}
  mid: {{vendor: anthropic, base_url: "{URL}", region: us}}
  far: {{vendor: mistral, base_url: "{URL}", region: us}}
models:
  - {{id: near/m, provider: near, upstream_model: m, category: small, quality: 70,
     context_window: 8000, max_output_tokens: 500, prices: {{input: "0.2", output: "0.4"}}}}
  - {{id: mid/m, provider: mid, upstream_model: m, category: small, quality: 70,
     context_window: 8000, max_output_tokens: 500, prices: {{input: "0.2", output: "0.4"}}}}
  - {{id: far/m, provider: far, upstream_model: m, category: small, quality: 70,
     context_window: 8000, max_output_tokens: 500, prices: {{input: "0.2", output: "0.4"}}}}
"""
)
# Milliseconds each model takes as seen from each region's edges.
MEASURED = {
    "us": {"near/m": 100, "mid/m": 300, "far/m": 900},
    "eu": {"near/m": 900, "mid/m": 300, "far/m": 100},
}
# Too few samples from here to trust: the global figure stands.
SPARSE_REGION = "ap"
SPARSE_MS = 500


def outcomes() -> list[health_pb2.AttemptOutcome]:
    """REGION_MIN_SAMPLES successes per model from each measured region (interleaved), and a
    few from the sparse one."""
    made: list[health_pb2.AttemptOutcome] = []
    for _ in range(REGION_MIN_SAMPLES):
        for region, latencies in MEASURED.items():
            for model, latency in latencies.items():
                made.append(
                    health_pb2.AttemptOutcome(
                        provider=model.split("/")[0],
                        model=model,
                        success=True,
                        total_latency_ms=latency,
                        region=region,
                    )
                )
    for _ in range(REGION_MIN_SAMPLES - 1):
        made.append(
            health_pb2.AttemptOutcome(
                provider="near",
                model="near/m",
                success=True,
                total_latency_ms=SPARSE_MS,
                region=SPARSE_REGION,
            )
        )
    return made


def health() -> list[health_pb2.ModelHealth]:
    book = HealthBook(HealthConfig(), clock=NOW.timestamp)
    book.apply_many(outcomes())
    return list(book.snapshot().entries)


def snapshot(entries: Iterable[health_pb2.ModelHealth] | None = None) -> router_pb2.RoutingSnapshot:
    return build_snapshot(CATALOG, version=7, health=health() if entries is None else entries, now=NOW)


def latency_first(table: RoutingTable) -> list[str]:
    request = common_pb2.ChatRequest(
        model="auto",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="hi")])],
        routing=common_pb2.RoutingHints(task_type=common_pb2.TASK_TYPE_SIMPLE_CHAT, preference=LATENCY),
    )
    plan = Planner(table).plan(request, now=NOW)
    return [candidate.model for candidate in plan.candidates]


def predicted(table: RoutingTable, model: str) -> int:
    request = common_pb2.ChatRequest(
        model=model,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="hi")])],
    )
    plan = Planner(table).plan(request, now=NOW)
    return plan.candidates[0].predicted_latency_ms


def test_the_snapshot_carries_the_latency_measured_from_each_region() -> None:
    routing = snapshot()
    by_key = {(lm.provider, lm.model, lm.region): lm for lm in routing.latency_models}
    for region, latencies in MEASURED.items():
        for model, latency in latencies.items():
            regional = by_key[(model.split("/")[0], model, region)]
            assert regional.samples == REGION_MIN_SAMPLES
            assert regional.base_ms == pytest.approx(latency)
            assert (regional.ms_per_input_token, regional.ms_per_output_token) == (0.0, 0.0)
    # One global model per (provider, model), over every region's outcomes.
    assert by_key[("far", "far/m", "")].samples == 2 * REGION_MIN_SAMPLES
    assert by_key[("near", "near/m", SPARSE_REGION)].samples == REGION_MIN_SAMPLES - 1
    # The health entries the edges receive carry the per-region figures too.
    near = next(e for e in routing.health if e.model == "near/m")
    assert [r.region for r in near.regions] == ["ap", "eu", "us"]
    assert near.regions[2].ewma_latency_ms == pytest.approx(100.0)
    # A serialised snapshot (what crosses the wire) keeps them.
    assert router_pb2.RoutingSnapshot.FromString(routing.SerializeToString()) == routing


def test_a_table_predicts_from_its_regions_latency_once_there_are_enough_samples() -> None:
    routing = snapshot()
    everywhere = RoutingTable.from_snapshot(routing)
    global_near = next(lm for lm in routing.latency_models if lm.model == "near/m" and not lm.region)
    assert everywhere.region == ""
    assert predicted(everywhere, "near/m") == round(global_near.base_ms)
    assert 100 < global_near.base_ms < 900  # both regions mixed
    assert predicted(RoutingTable.from_snapshot(routing, region="us"), "near/m") == 100
    assert predicted(RoutingTable.from_snapshot(routing, region="eu"), "near/m") == 900
    # Too few samples from "ap", and nothing from "sa": the global figure.
    assert predicted(RoutingTable.from_snapshot(routing, region=SPARSE_REGION), "near/m") == round(
        global_near.base_ms
    )
    assert predicted(RoutingTable.from_snapshot(routing, region="sa"), "near/m") == round(global_near.base_ms)
    # Confidence follows the samples of the model the prediction rests on (all exact here).
    us_route = RoutingTable.from_snapshot(routing, region="us").models["mid/m"]
    assert us_route.confidence == pytest.approx(REGION_MIN_SAMPLES / CONFIDENT_SAMPLES)
    assert everywhere.models["mid/m"].confidence == pytest.approx(2 * REGION_MIN_SAMPLES / CONFIDENT_SAMPLES)


def test_the_latency_strategy_ranks_by_the_latency_measured_from_the_region() -> None:
    routing = snapshot()
    assert latency_first(RoutingTable.from_snapshot(routing, region="us")) == ["near/m", "mid/m", "far/m"]
    assert latency_first(RoutingTable.from_snapshot(routing, region="eu")) == ["far/m", "mid/m", "near/m"]
    # Seen from everywhere at once, the model that is fast nowhere in particular but never slow wins.
    assert latency_first(RoutingTable.from_snapshot(routing))[0] == "mid/m"


def test_an_edge_plans_on_the_latency_of_its_own_region() -> None:
    class NoRouter:
        def WatchRoutes(self, request: object, *, timeout: float | None = None) -> object:
            raise AssertionError("not called: the test applies snapshots itself")

    planner = Planner(RoutingTable.from_catalog(CATALOG))
    watcher = RouteWatcher(NoRouter(), planner, "edge-eu", region="eu")
    assert watcher.apply(snapshot())
    assert planner.table.region == "eu"
    assert latency_first(planner.table) == ["far/m", "mid/m", "near/m"]


def test_a_providers_traffic_error_rate_weighs_on_none_of_its_models() -> None:
    # The provider's entry aggregates every model's traffic; only its status (from probes) counts.
    failing = [
        health_pb2.ModelHealth(
            provider="near", model="", status=health_pb2.HEALTH_STATUS_HEALTHY, error_rate=0.9, samples=10
        ),
        health_pb2.ModelHealth(provider="mid", model="", status=health_pb2.HEALTH_STATUS_DEGRADED, samples=3),
    ]
    table = RoutingTable.from_snapshot(snapshot(failing))
    assert table.models["near/m"].health_score == 1.0
    assert table.models["mid/m"].health_score == 0.5
