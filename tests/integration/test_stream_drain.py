"""Shutdown of the control planes with subscribers connected: the router's `WatchRoutes`, the
health monitor's `Watch` and the ledger's `WatchBudgets` and `CommitStream` end cleanly at once
when shutdown begins (instead of holding the whole grace period and being cut at its end), new
ones are refused as shutting down, and every client picks up again on another replica at once
and without losing or double-charging a commit.

The services run in process over real gRPC, built by their own `build(settings)` and shut down
as `serve` does on SIGTERM: `ServiceParts.drain`, then `stop(grace)`. A `Proxy` stands in for
Envoy: each new call goes to the first replica that is not shutting down. The last test does
the same with the whole mesh as real processes stopped by SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from switchyard.common.errors import from_rpc_error, is_shutting_down
from switchyard.common.ports import free_port
from switchyard.common.server import RunningServer, ServiceParts, build_server
from switchyard.common.settings import Settings
from switchyard.common.sql import open_database
from switchyard.edge import budget as budget_module
from switchyard.edge import outbox as outbox_module
from switchyard.edge import routes as routes_module
from switchyard.edge.budget import LeaseBook, LedgerLeases
from switchyard.edge.outbox import CommitOutbox, LedgerCommits
from switchyard.edge.routes import RouteSource, RouteWatcher
from switchyard.health import service as health_service
from switchyard.ledger import service as ledger_service
from switchyard.ledger.service import Ledger
from switchyard.router import service as router_service
from switchyard.router.plan import Planner
from switchyard.router.table import RoutingTable
from switchyard.v1 import (
    common_pb2,
    gateway_pb2,
    health_pb2,
    health_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.conftest import Mesh, running_mesh
from tests.support.otlp import OtlpReceiver

# What the services get to finish in-flight calls; a drained one stops long before its end.
GRACE_S = 30.0
# The functional bound on a stop with subscribers connected (not a benchmark).
PROMPT_S = 5.0
MODEL = "openai/gpt-4o-mini"


# --- replicas and the proxy in front of them ----------------------------------------------------


@dataclass
class Replica:
    """One service replica serving on a free port, and a channel to it."""

    parts: ServiceParts
    running: RunningServer
    channel: grpc.aio.Channel
    going_away: bool = False

    async def shut_down(self, grace_s: float = GRACE_S) -> float:
        """Shut down as `serve` does on SIGTERM (drain, then stop with the grace); the seconds
        the stop took."""
        self.going_away = True
        started = time.monotonic()
        assert self.parts.drain is not None, "the service drains nothing at shutdown"
        self.parts.drain()
        await self.running.stop(grace_s)
        return time.monotonic() - started


@dataclass
class Replicas:
    """The replicas a test started; all stopped and closed when it ends."""

    started: list[Replica] = field(default_factory=list)

    async def start(self, parts: ServiceParts) -> Replica:
        if parts.start is not None:
            await parts.start()
        running = await build_server(parts.bindings)
        replica = Replica(parts, running, grpc.aio.insecure_channel(f"127.0.0.1:{running.port}"))
        self.started.append(replica)
        return replica

    async def close(self) -> None:
        for replica in self.started:
            await replica.channel.close()
            await replica.running.stop(None)
            if replica.parts.close is not None:
                await replica.parts.close()


@pytest.fixture
async def replicas() -> AsyncIterator[Replicas]:
    started = Replicas()
    try:
        yield started
    finally:
        await started.close()


class Proxy:
    """Stands in for Envoy in front of replicas: each new call goes to the first replica that
    is not shutting down (Envoy stops routing to one whose health check fails)."""

    def __init__(self, stub: Callable[[grpc.aio.Channel], Any], replicas: list[Replica]) -> None:
        self._stub = stub
        self._replicas = replicas
        self.calls: list[int] = []  # which replica each call went to

    def __getattr__(self, method: str) -> Any:
        index = next((i for i, r in enumerate(self._replicas) if not r.going_away), len(self._replicas) - 1)
        self.calls.append(index)
        return getattr(self._stub(self._replicas[index].channel), method)


class RecordingLog:
    """Stands in for a module's structlog logger."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, *args, **fields: self.events.append((level, event))

    def at(self, *levels: str) -> list[str]:
        return [event for level, event in self.events if level in levels]


def record_log(monkeypatch: pytest.MonkeyPatch, module: object) -> RecordingLog:
    recording = RecordingLog()
    monkeypatch.setattr(module, "log", recording)
    return recording


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> float:
    """Seconds until `condition()` holds; fails the test after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def ends_cleanly(call: Any) -> None:
    """`call` (a server stream) ends by itself, with status OK, within a second."""
    async with asyncio.timeout(1):
        while await call.read() is not grpc.aio.EOF:
            pass
    assert await call.code() is grpc.StatusCode.OK


async def refused_as_shutting_down(call: Any) -> None:
    """`call` is refused UNAVAILABLE because the replica is shutting down."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(2):
            await call.read()
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert is_shutting_down(caught.value), from_rpc_error(caught.value)


def router_settings() -> Settings:
    # No health monitor: the router keeps planning on the catalog alone.
    return Settings(health_target=f"127.0.0.1:{free_port()}")


def health_settings() -> Settings:
    return Settings(health_probe_interval_s=0)


def ledger_settings(database: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{database}")


# --- each service drains its streams ------------------------------------------------------------


async def test_a_draining_router_ends_its_watches_at_once_and_refuses_new_ones(replicas: Replicas) -> None:
    router = await replicas.start(router_service.build(router_settings()))
    stub = router_pb2_grpc.RouterServiceStub(router.channel)
    watches = [stub.WatchRoutes(router_pb2.WatchRoutesRequest(subscriber_id=f"edge-{n}")) for n in range(2)]
    for watch in watches:
        assert (await watch.read()).snapshot.version > 0
    stopping = asyncio.create_task(router.shut_down())
    for watch in watches:
        await ends_cleanly(watch)
    assert await stopping < PROMPT_S


async def test_a_router_refuses_watches_once_draining(replicas: Replicas) -> None:
    router = await replicas.start(router_service.build(router_settings()))
    assert router.parts.drain is not None
    router.parts.drain()
    stub = router_pb2_grpc.RouterServiceStub(router.channel)
    await refused_as_shutting_down(stub.WatchRoutes(router_pb2.WatchRoutesRequest(subscriber_id="late")))
    # Plan and Explain still answer until the server stops (in-flight edges' calls finish).
    assert (await stub.Plan(router_pb2.PlanRequest(request=chat_request()), timeout=5)).candidates


async def test_a_draining_health_monitor_ends_its_watches_at_once_and_refuses_new_ones(
    replicas: Replicas,
) -> None:
    monitor = await replicas.start(health_service.build(health_settings()))
    stub = health_pb2_grpc.HealthMonitorServiceStub(monitor.channel)
    watch = stub.Watch(health_pb2.WatchRequest(subscriber_id="router-1"))
    assert (await watch.read()).HasField("snapshot")
    assert monitor.parts.drain is not None
    monitor.parts.drain()
    await ends_cleanly(watch)
    await refused_as_shutting_down(stub.Watch(health_pb2.WatchRequest(subscriber_id="late")))
    started = time.monotonic()
    await monitor.running.stop(GRACE_S)
    assert time.monotonic() - started < PROMPT_S


async def test_a_draining_ledger_ends_its_watches_and_idle_commit_streams_and_refuses_new_ones(
    replicas: Replicas, tmp_path: Path
) -> None:
    ledger = await replicas.start(ledger_service.build(ledger_settings(tmp_path / "ledger.db")))
    stub = ledger_pb2_grpc.CostLedgerServiceStub(ledger.channel)
    watch = stub.WatchBudgets(ledger_pb2.WatchBudgetsRequest(subscriber_id="edge-1"))
    assert (await watch.read()).version > 0
    commits = stub.CommitStream()
    await commits.write(ledger_pb2.CommitManyRequest(commits=[commit("acme", "req-idle")]))
    assert [r.request_id for r in (await commits.read()).results] == ["req-idle"]
    assert ledger.parts.drain is not None
    ledger.parts.drain()
    await ends_cleanly(watch)
    await ends_cleanly(commits)  # idle between batches: nothing to finish
    await refused_as_shutting_down(stub.WatchBudgets(ledger_pb2.WatchBudgetsRequest(subscriber_id="late")))
    late = stub.CommitStream()
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await late.write(ledger_pb2.CommitManyRequest(commits=[commit("acme", "req-late")]))
    await refused_as_shutting_down(late)
    started = time.monotonic()
    await ledger.running.stop(GRACE_S)
    assert time.monotonic() - started < PROMPT_S
    # The late batch was never committed: only the first request has a row.
    totals = await ledger_totals(ledger_settings(tmp_path / "ledger.db"), "acme", replicas)
    assert totals.requests == 1


# --- the clients pick up again on another replica -----------------------------------------------


async def test_an_edge_follows_the_next_router_at_once_when_its_router_shuts_down(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = record_log(monkeypatch, routes_module)
    first = await replicas.start(router_service.build(router_settings()))
    await asyncio.sleep(0.01)  # the second router's snapshot versions are newer (wall-clock ms)
    second = await replicas.start(router_service.build(router_settings()))
    proxy = Proxy(router_pb2_grpc.RouterServiceStub, [first, second])
    planner = Planner(RoutingTable.from_catalog(Settings().catalog))
    watcher = RouteWatcher(cast(RouteSource, proxy), planner, "edge-1")
    watcher.start()
    try:
        assert await watcher.wait_for_snapshot(5)
        version = watcher.version
        assert await first.shut_down() < PROMPT_S
        took = await until(lambda: watcher.version > version)  # the second router's snapshot
        assert took < 2.0 and watcher.connected
    finally:
        await watcher.aclose()
    assert proxy.calls == [0, 1]
    assert log.events == [("info", "routes_stream_ended"), ("info", "routes_resumed")]


async def test_a_router_follows_the_next_health_monitor_at_once_when_its_monitor_shuts_down(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = record_log(monkeypatch, router_service)
    first = await replicas.start(health_service.build(health_settings()))
    second = await replicas.start(health_service.build(health_settings()))
    # Only the second monitor has heard of a failure, so its picture tells the two apart.
    second_stub = health_pb2_grpc.HealthMonitorServiceStub(second.channel)
    failure = health_pb2.AttemptOutcome(
        provider="openai", model=MODEL, success=False, error_reason="PROVIDER_UNAVAILABLE"
    )
    await second_stub.Report(health_pb2.ReportRequest(outcomes=[failure]), timeout=5)
    snapshot = health_pb2.SnapshotRequest()
    deadline = time.monotonic() + 5
    while not (await second_stub.Snapshot(snapshot, timeout=5)).snapshot.entries:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    state = router_service.RoutingState(
        Settings().catalog, router_service.routing_settings(Settings()), weight_floor=0.05
    )
    proxy = Proxy(health_pb2_grpc.HealthMonitorServiceStub, [first, second])

    def models_with_health() -> list[str]:
        return sorted(h.model for h in state.rebuild().health if h.model)  # not the provider's

    following = asyncio.create_task(
        router_service.follow_health(state, cast(health_pb2_grpc.HealthMonitorServiceStub, proxy), "router-1")
    )
    try:
        await until(lambda: proxy.calls == [0])
        await asyncio.sleep(0.1)
        assert models_with_health() == []  # the first monitor's (empty) picture
        assert await first.shut_down() < PROMPT_S
        took = await until(lambda: models_with_health() == [MODEL])
        assert took < 2.0
    finally:
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
    assert proxy.calls == [0, 1]
    assert log.events == [("info", "health_watch_ended"), ("info", "health_watch_resumed")]


async def test_an_edge_follows_the_next_ledgers_budgets_at_once_when_its_ledger_shuts_down(
    replicas: Replicas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = record_log(monkeypatch, budget_module)
    settings = ledger_settings(tmp_path / "ledger.db")
    first = await replicas.start(ledger_service.build(settings))
    second = await replicas.start(ledger_service.build(settings))
    proxy = Proxy(ledger_pb2_grpc.CostLedgerServiceStub, [first, second])
    book = LeaseBook(cast(LedgerLeases, proxy), "edge-1")
    book.start_watching()
    try:
        await until(lambda: book.watching)
        assert await first.shut_down() < PROMPT_S
        await until(lambda: proxy.calls[-1:] == [1] and book.watching, timeout_s=2.0)
    finally:
        await book.aclose()
    assert [c for c in proxy.calls if c == 0] == [0]  # one WatchBudgets to the first
    assert log.at("warning", "error") == []
    assert ("info", "budget_watch_ended") in log.events


async def test_a_batch_committing_when_the_ledger_drains_is_answered_and_the_rest_go_to_the_next(
    replicas: Replicas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The edge's outbox sends a batch; shutdown begins while the ledger commits it. The batch
    # is answered (charged once) and the stream ends; the batch the outbox sends next goes to
    # the next replica at once. Every commit is recorded exactly once, and nothing is logged
    # as a failure.
    log = record_log(monkeypatch, outbox_module)
    committing, release = asyncio.Event(), asyncio.Event()
    commit_many = Ledger.commit_many
    calls: list[tuple[Ledger, list[str]]] = []

    async def gated(self: Ledger, commits: Any) -> list[ledger_pb2.CommitResponse]:
        calls.append((self, [c.record.request_id for c in commits]))
        if not committing.is_set():  # the first batch waits in the ledger until released
            committing.set()
            await release.wait()
        return await commit_many(self, commits)

    monkeypatch.setattr(Ledger, "commit_many", gated)
    settings = ledger_settings(tmp_path / "ledger.db")
    first = await replicas.start(ledger_service.build(settings))
    second = await replicas.start(ledger_service.build(settings))
    proxy = Proxy(ledger_pb2_grpc.CostLedgerServiceStub, [first, second])
    answered: list[tuple[str, bool, int]] = []
    edge_db = await open_database(f"sqlite:///{tmp_path / 'edge.db'}")
    outbox = await CommitOutbox.open(
        edge_db,
        cast(LedgerCommits, proxy),
        "edge-1",
        on_result=lambda c, r: answered.append((r.request_id, r.duplicate, r.charged_micros)),
    )
    outbox.start()
    ids = [f"req-{n}" for n in range(6)]
    try:
        for request_id in ids[:3]:
            outbox.add(ledger_pb2.CommitRequest(record=usage("acme", request_id)))
        async with asyncio.timeout(5):
            await committing.wait()
        for request_id in ids[3:]:
            outbox.add(ledger_pb2.CommitRequest(record=usage("acme", request_id)))
        stopping = asyncio.create_task(first.shut_down())
        await asyncio.sleep(0.05)  # shutdown has begun with the first batch in the ledger
        release.set()
        assert await stopping < PROMPT_S
        await outbox.flush(timeout_s=5)
        left = await edge_db.fetch_one("SELECT COUNT(*) AS n FROM commit_outbox")
        assert left is not None and int(left["n"]) == 0
    finally:
        await outbox.aclose()
        await edge_db.close()
    # The first batch committed (and answered) by the first replica, the rest by the second.
    first_ledger = calls[0][0]
    assert calls[0][1] == ids[:3]
    assert sorted(r for ledger, batch in calls[1:] for r in batch) == ids[3:]
    assert all(ledger is not first_ledger for ledger, _ in calls[1:])
    assert sorted(r for r, _, _ in answered) == ids and not any(dup for _, dup, _ in answered)
    totals = await ledger_totals(settings, "acme", replicas)
    assert totals.requests == 6
    assert totals.cost_micros == sum(charged for _, _, charged in answered) > 0
    assert log.at("warning", "error") == []
    assert ("info", "commit_stream_ended") in log.events


# --- the mesh as processes ----------------------------------------------------------------------


async def test_sigterm_stops_health_router_and_ledger_promptly_with_edges_subscribed(
    otlp: OtlpReceiver, tmp_path: Path
) -> None:
    # The whole mesh as `switchyard run` starts it, with a 30 s grace: each control plane with
    # subscribers connected (the router on the monitor, the edge on the router and the ledger,
    # with a commit stream open) stops well within it.
    async with running_mesh(otlp, tmp_path, env={"SWITCHYARD_SHUTDOWN_GRACE_S": str(GRACE_S)}) as mesh:
        await mesh.gateway().Chat(chat_request(), timeout=30)
        async with grpc.aio.insecure_channel(mesh.target("ledger")) as channel:
            ledger = ledger_pb2_grpc.CostLedgerServiceStub(channel)
            # Committed: the edge's outbox has its commit stream open.
            deadline = time.monotonic() + 15
            while not (
                await ledger.GetUsage(gateway_pb2.GetUsageRequest(tenant_id="default"), timeout=5)
            ).totals.requests:
                assert time.monotonic() < deadline, "the chat was never committed"
                await asyncio.sleep(0.05)
        for subscribed in ("health_watch_subscribed", "routes_subscribed", "budgets_watched"):
            await until(functools.partial(logged, mesh, subscribed), timeout_s=15)
        for name in ("health", "router", "ledger"):
            pid = mesh.supervisor.pid(name)
            assert pid is not None
            os.kill(pid, signal.SIGTERM)
            took = await until(functools.partial(exited, mesh, name), timeout_s=GRACE_S + 5)
            assert took < PROMPT_S, f"{name} took {took:.1f} s to stop"
        logs = mesh.logs()
    for event in ("health_watch_ended", "routes_stream_ended", "budget_watch_ended"):
        assert event in logs


# --- helpers ------------------------------------------------------------------------------------


def logged(mesh: Mesh, event: str) -> bool:
    return event in mesh.logs()


def exited(mesh: Mesh, child: str) -> bool:
    return mesh.supervisor.pid(child) is None


def usage(tenant: str, request_id: str) -> ledger_pb2.UsageRecord:
    record = ledger_pb2.UsageRecord(
        request_id=request_id,
        scope=ledger_pb2.BudgetScope(tenant_id=tenant),
        model=MODEL,
        provider="openai",
        usage=common_pb2.Usage(input_tokens=1000, output_tokens=100),
        latency_ms=120,
        status="ok",
        attempts=1,
    )
    record.finished_at.GetCurrentTime()
    return record


def commit(tenant: str, request_id: str) -> ledger_pb2.CommitRequest:
    return ledger_pb2.CommitRequest(record=usage(tenant, request_id))


def chat_request() -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=MODEL)
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="hi")])
    return request


async def ledger_totals(settings: Settings, tenant: str, replicas: Replicas) -> gateway_pb2.UsageTotals:
    """The tenant's totals this month, as a fresh ledger on the same database reads them."""
    reader = await replicas.start(ledger_service.build(settings))
    reply = await ledger_pb2_grpc.CostLedgerServiceStub(reader.channel).GetUsage(
        gateway_pb2.GetUsageRequest(tenant_id=tenant), timeout=10
    )
    return reply.totals
