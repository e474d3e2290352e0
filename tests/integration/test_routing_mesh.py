"""Routing through the whole mesh: three providers of equal models, one goes down mid-run.

Real processes: three simulated OpenAI-compatible vendors, their adapter, the health
monitor (breakers from the edge's outcome reports and from its own probes), the router
(snapshots pushed to the edge) and the edge planning locally; a second edge joins for the
propagation test. Breakers turn half-open after 1 s here so recovery fits in a test.
Propagation times are printed (`-s`), not asserted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from switchyard.common.ports import free_port
from switchyard.supervisor import ReadinessCheck, Supervisor
from switchyard.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    health_pb2,
    health_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.conftest import Mesh, SimControl, running_mesh
from tests.support.auth import keyed_channel
from tests.support.otlp import OtlpReceiver

PROVIDERS = ("alpha", "beta", "gamma")
# Probes ask for a one-token completion (`probe: completion`), so a simulator's failure knob
# fails them too.
PROBE_INTERVAL_S = 0.3


def catalog_yaml(rules: str = "") -> str:
    providers = "\n".join(
        f"  {name}: {{vendor: openai_compatible, base_url: 'http://127.0.0.1:9/v1', region: us,"
        f" options: {{probe: completion}}}}"
        for name in PROVIDERS
    )
    models = "\n".join(
        f"  - {{id: {name}/small, provider: {name}, upstream_model: small-1, context_window: 8000,"
        f" max_output_tokens: 512, prices: {{input: '0.2', output: '0.4'}}, category: small, quality: 70,"
        f" capabilities: [streaming]}}"
        for name in PROVIDERS
    )
    return (
        f"providers:\n{providers}\nmodels:\n{models}\ndefault_model: alpha/small\n"
        # The tests send requests back to back for many seconds: a tier no rate limit stops.
        f"tiers:\n  unmetered: {{requests_per_minute: 1000000}}\n"
        f"tenants:\n  default:\n    tier: unmetered\n{rules}"
    )


@pytest.fixture(scope="module")
async def routing_mesh(otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    workdir = tmp_path_factory.mktemp("routing-mesh")
    catalog = workdir / "catalog.yaml"
    catalog.write_text(catalog_yaml())
    env = {
        "SWITCHYARD_HEALTH_OPEN_S": "1",
        # Failures leave the error rate after 4 s, so a recovered provider is back in the band soon.
        "SWITCHYARD_HEALTH_WINDOW_S": "4",
        "SWITCHYARD_HEALTH_PROBE_INTERVAL_S": str(PROBE_INTERVAL_S),
        "SWITCHYARD_HEALTH_REPORT_INTERVAL_S": "0.1",
        "SWITCHYARD_ROUTER_RELOAD_S": "0.2",
        "SWITCHYARD_EDGE_DEDUP": "false",
    }
    async with running_mesh(otlp, workdir, catalog_path=catalog, env=env) as mesh:
        yield mesh


@pytest.fixture(scope="module")
async def second_edge(
    routing_mesh: Mesh, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[gateway_pb2_grpc.GatewayServiceStub]:
    """Another edge process, configured as the mesh's own, subscribed to the same router."""
    edge = next(c for c in routing_mesh.plan.children if c.name == "edge")
    port = free_port()
    target = f"127.0.0.1:{port}"
    spec = dataclasses.replace(
        edge,
        name="edge-2",
        env={**edge.env, "SWITCHYARD_PORT": str(port), "SWITCHYARD_HTTP_PORT": "0"},
        readiness=ReadinessCheck.grpc_health(target),
    )
    log_path = tmp_path_factory.mktemp("second-edge") / "edge.log"
    with log_path.open("w") as out:
        supervisor = Supervisor([spec], out=out, color=False)
        await supervisor.start()
        channel = keyed_channel(target)
        try:
            await supervisor.wait_ready(60)
            # Ready to serve is not yet following the router: wait for its WatchRoutes call.
            async with asyncio.timeout(15):
                while True:
                    lines = routing_mesh.logs().splitlines()
                    if any("routes_subscribed" in line and f"-{port}" in line for line in lines):
                        break
                    await asyncio.sleep(0.05)
            yield gateway_pb2_grpc.GatewayServiceStub(channel)
        finally:
            await channel.close()
            await supervisor.stop(grace_s=5)


@pytest.fixture
async def sims(routing_mesh: Mesh) -> AsyncIterator[dict[str, SimControl]]:
    controls = {name: SimControl(routing_mesh.plan.simulator_urls[name]) for name in PROVIDERS}
    for control in controls.values():
        await control.reset()
    try:
        yield controls
    finally:
        for control in controls.values():
            await control.reset()
            await control.close()


def auto_request(text: str) -> common_pb2.ChatRequest:
    return common_pb2.ChatRequest(
        model="auto",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])],
        routing=common_pb2.RoutingHints(task_type=common_pb2.TASK_TYPE_SIMPLE_CHAT),
        cache=common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_SKIP),
    )


async def serve(mesh: Mesh, count: int, tag: str) -> list[tuple[str, list[str]]]:
    """`count` auto requests one after another: (provider that answered, providers attempted)."""
    gateway = mesh.gateway()
    served = []
    for index in range(count):
        response = await gateway.Chat(auto_request(f"{tag} question {index}"), timeout=10)
        served.append((response.routing.provider, [a.provider for a in response.attempts]))
    return served


async def explain(mesh: Mesh) -> dict[str, router_pb2.ScoredCandidate]:
    router = router_pb2_grpc.RouterServiceStub(grpc.aio.insecure_channel(mesh.target("router")))
    response = await router.Explain(
        router_pb2.ExplainRequest(request=auto_request("hello"), tenant_id="default"), timeout=5
    )
    return {row.candidate.model: row for row in response.rows}


async def state(mesh: Mesh) -> dict[str, object]:
    """What the router and the health monitor think now, for a failing assertion to show."""
    rows = {
        model: (row.filtered, row.filter_reason, row.rank, dict(row.score_components))
        for model, row in (await explain(mesh)).items()
    }
    snapshot = (await health_stub(mesh).Snapshot(health_pb2.SnapshotRequest(), timeout=5)).snapshot
    health = {
        f"{e.provider}:{e.model}": (
            e.samples,
            round(e.error_rate, 3),
            round(e.ewma_latency_ms, 1),
            round(e.output_tokens_per_second, 1),
            health_pb2.BreakerState.Name(e.breaker),
        )
        for e in snapshot.entries
    }
    router = router_pb2_grpc.RouterServiceStub(grpc.aio.insecure_channel(mesh.target("router")))
    watch = router.WatchRoutes(router_pb2.WatchRoutesRequest(subscriber_id="test-state"))
    first = await anext(aiter(watch))
    watch.cancel()
    fits = {
        f"{m.provider}:{m.model}": (
            round(m.base_ms, 2),
            round(m.ms_per_input_token, 4),
            round(m.ms_per_output_token, 4),
            m.samples,
            round(m.prediction_error, 3),
        )
        for m in first.snapshot.latency_models
    }
    return {"explain": rows, "health": health, "latency_models": fits}


def health_stub(mesh: Mesh) -> health_pb2_grpc.HealthMonitorServiceStub:
    return health_pb2_grpc.HealthMonitorServiceStub(grpc.aio.insecure_channel(mesh.target("health")))


async def health_entry(mesh: Mesh, provider: str, model: str) -> health_pb2.ModelHealth | None:
    snapshot = (
        await health_stub(mesh).Snapshot(health_pb2.SnapshotRequest(provider=provider), timeout=5)
    ).snapshot
    return next((e for e in snapshot.entries if e.model == model), None)


async def until_filtered(
    mesh: Mesh, model: str, filtered: bool, within_s: float
) -> router_pb2.ScoredCandidate:
    """Explain's row for `model` once it has one whose filtered flag is `filtered`."""
    async with asyncio.timeout(within_s):
        while True:
            row = (await explain(mesh)).get(model)
            if row is not None and row.filtered == filtered:
                return row
            await asyncio.sleep(0.05)


async def until_not_attempted(mesh: Mesh, provider: str, tag: str, within_s: float) -> None:
    """Serve a few requests at a time until none of them even tries `provider`."""
    async with asyncio.timeout(within_s):
        while True:
            if all(provider not in attempted for _, attempted in await serve(mesh, 3, tag)):
                return
            await asyncio.sleep(0.05)


async def test_traffic_leaves_a_failing_provider_and_returns_after_recovery(
    routing_mesh: Mesh, sims: dict[str, SimControl]
) -> None:
    before = Counter(provider for provider, _ in await serve(routing_mesh, 30, "warm"))
    # Balanced among equals: everyone serves.
    assert set(before) == set(PROVIDERS) and min(before.values()) >= 5, (before, await state(routing_mesh))

    await sims["beta"].knobs(status=500)
    # Requests keep succeeding (failover) while the edge's reports and the probes open beta's
    # breakers; from then on the edge does not even try beta.
    async with asyncio.timeout(15):
        while True:
            served = await serve(routing_mesh, 5, "down")
            assert all(provider != "beta" for provider, _ in served)
            if (await explain(routing_mesh))["beta/small"].filtered:
                break
    row = (await explain(routing_mesh))["beta/small"]
    assert "breaker open" in row.filter_reason or "provider beta down" in row.filter_reason
    await until_not_attempted(routing_mesh, "beta", "left", within_s=5)
    served = await serve(routing_mesh, 10, "without-beta")
    assert all("beta" not in attempted for _, attempted in served)
    # What beta served moves to both of the others, not to one of them.
    during = Counter(provider for provider, _ in served)
    deadline = time.monotonic() + 10
    while min(during["alpha"], during["gamma"]) < 3 and time.monotonic() < deadline:
        during.update(provider for provider, _ in await serve(routing_mesh, 10, "without-beta"))
    assert set(during) == {"alpha", "gamma"}, (during, await state(routing_mesh))
    assert min(during.values()) >= 3, (during, await state(routing_mesh))
    entries = [await health_entry(routing_mesh, "beta", model) for model in ("", "beta/small")]
    assert any(e is not None and e.status == health_pb2.HEALTH_STATUS_DOWN for e in entries), entries

    await sims["beta"].reset()
    # After the open period probes and trial requests get through; a success closes the breaker.
    await until_filtered(routing_mesh, "beta/small", False, within_s=10)
    returned = Counter[str]()
    deadline = time.monotonic() + 10
    while returned["beta"] < 3 and time.monotonic() < deadline:
        returned.update(provider for provider, _ in await serve(routing_mesh, 10, "up"))
    assert returned["beta"] >= 3, (returned, await state(routing_mesh))
    # Beta takes its share back beside the others, which keep theirs.
    assert set(returned) == set(PROVIDERS), (returned, await state(routing_mesh))


def gamma_request(tag: str) -> common_pb2.ChatRequest:
    request = auto_request(f"gamma please {tag}")
    request.model = "gamma/small"
    return request


async def asked_for_gamma(gateway: gateway_pb2_grpc.GatewayServiceStub, tag: str) -> gateway_pb2.ChatResponse:
    """A request naming gamma/small: the edge plans gamma first unless its snapshot gates it."""
    response: gateway_pb2.ChatResponse = await gateway.Chat(gamma_request(tag), timeout=10)
    return response


async def until_edge_plans_gamma(
    gateway: gateway_pb2_grpc.GatewayServiceStub, tag: str, within_s: float
) -> None:
    """Wait until a request naming gamma/small is answered by gamma at this edge."""
    async with asyncio.timeout(within_s):
        while True:
            if (await asked_for_gamma(gateway, tag)).routing.provider == "gamma":
                return
            await asyncio.sleep(0.05)


async def until_edge_avoids_gamma(gateway: gateway_pb2_grpc.GatewayServiceStub, tag: str) -> float:
    """When (monotonic) a request naming gamma/small was first planned without gamma here."""
    index = 0
    while True:
        index += 1
        response = await asked_for_gamma(gateway, f"{tag} {index}")
        if all(attempt.provider != "gamma" for attempt in response.attempts):
            return time.monotonic()


async def test_a_breaker_reported_open_reaches_every_subscribed_edge(
    routing_mesh: Mesh,
    second_edge: gateway_pb2_grpc.GatewayServiceStub,
    sims: dict[str, SimControl],
) -> None:
    edges = {"edge": routing_mesh.gateway(), "edge-2": second_edge}
    # Both edges plan gamma first for a request naming it, so avoiding it later shows the change.
    for name, gateway in edges.items():
        await until_edge_plans_gamma(gateway, f"{name} before", within_s=10)
    router = router_pb2_grpc.RouterServiceStub(grpc.aio.insecure_channel(routing_mesh.target("router")))
    watch = router.WatchRoutes(router_pb2.WatchRoutesRequest(subscriber_id="test"))
    first = await anext(aiter(watch))
    assert first.snapshot.version > 0
    failures = [
        health_pb2.AttemptOutcome(
            provider="gamma", model="gamma/small", success=False, error_reason="TIMEOUT"
        )
        for _ in range(5)
    ]
    reported = time.monotonic()
    await health_stub(routing_mesh).Report(
        health_pb2.ReportRequest(outcomes=failures, reporter_id="test"), timeout=5
    )
    # Gamma fails from now on, so each half-open trial (after 1 s) opens the breaker again and
    # an edge slower than that still ends up gated: no timing hides in the waits below.
    await sims["gamma"].knobs(status=500)

    async def subscriber_sees_open() -> float:
        key = ("gamma", "gamma/small")
        async for response in watch:
            entry = next((h for h in response.snapshot.health if (h.provider, h.model) == key), None)
            if entry is not None and entry.breaker == health_pb2.BREAKER_STATE_OPEN:
                return time.monotonic()
        raise AssertionError("the WatchRoutes stream ended")

    try:
        async with asyncio.timeout(20):
            arrivals = await asyncio.gather(
                subscriber_sees_open(),
                *(until_edge_avoids_gamma(gateway, f"{name} after") for name, gateway in edges.items()),
            )
    finally:
        watch.cancel()
    # An edge's time is its first request planned without gamma: an upper bound, request included.
    for name, arrived in zip(("a WatchRoutes subscriber", *edges), arrivals, strict=True):
        print(f"breaker open reached {name} in {(arrived - reported) * 1000:.0f} ms")

    await sims["gamma"].reset()
    # Recovery reaches every edge too: each plans gamma first again.
    for name, gateway in edges.items():
        await until_edge_plans_gamma(gateway, f"{name} back", within_s=15)


async def test_a_rule_edit_in_the_catalog_file_reaches_the_edge(routing_mesh: Mesh) -> None:
    catalog = Path(
        next(c for c in routing_mesh.plan.children if c.name == "router").env["SWITCHYARD_CATALOG"]
    )
    original = await asyncio.to_thread(catalog.read_text)
    rule = "    routing_rules:\n      - name: pin-alpha\n        then: {pin: alpha/small}\n"
    gateway = routing_mesh.gateway()
    try:
        edited = time.monotonic()
        await asyncio.to_thread(catalog.write_text, catalog_yaml(rule))
        async with asyncio.timeout(10):
            while True:
                response = await gateway.Chat(auto_request("which rule"), timeout=10)
                if response.routing.reason.startswith("rule 1 (pin-alpha)"):
                    break
                await asyncio.sleep(0.02)
        print(f"a rule edit reached the edge in {(time.monotonic() - edited) * 1000:.0f} ms")
        served = await serve(routing_mesh, 6, "pinned")
        assert all(provider == "alpha" for provider, _ in served)
    finally:
        await asyncio.to_thread(catalog.write_text, original)
    await until_filtered(routing_mesh, "beta/small", False, within_s=5)


async def wait_for_provider(
    mesh: Mesh, provider: str, status: int, within_s: float
) -> health_pb2.ModelHealth:
    async with asyncio.timeout(within_s):
        while True:
            entry = await health_entry(mesh, provider, "")
            if entry is not None and entry.status == status:
                return entry
            await asyncio.sleep(0.1)


async def test_probes_alone_take_a_provider_out_and_bring_it_back(
    routing_mesh: Mesh, sims: dict[str, SimControl]
) -> None:
    await sims["gamma"].knobs(status=500)
    # No caller traffic: only the health monitor's probes see gamma failing.
    down = await wait_for_provider(routing_mesh, "gamma", health_pb2.HEALTH_STATUS_DOWN, within_s=10)
    assert down.breaker == health_pb2.BREAKER_STATE_OPEN
    assert "consecutive failures" in down.reason
    assert down.last_error == "PROVIDER_UNAVAILABLE"
    # The router rebuilds on the change and pushes it; the edge plans on what it was pushed.
    row = await until_filtered(routing_mesh, "gamma/small", True, within_s=5)
    assert "provider gamma down" in row.filter_reason
    await until_not_attempted(routing_mesh, "gamma", "probed-out", within_s=5)
    served = await serve(routing_mesh, 6, "probed-out")
    assert all("gamma" not in attempted for _, attempted in served)

    await sims["gamma"].reset()
    up = await wait_for_provider(routing_mesh, "gamma", health_pb2.HEALTH_STATUS_HEALTHY, within_s=10)
    assert up.breaker == health_pb2.BREAKER_STATE_CLOSED
    await until_filtered(routing_mesh, "gamma/small", False, within_s=5)
