"""The router service: versioned snapshots and their subscribers, the rebuild pacing (critical
health changes at once, statistics at a steady pace), the catalog file follower, the health
monitor follower and the Plan / Explain / WatchRoutes handlers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from switchyard.common.catalog import Catalog, load_catalog, parse_catalog
from switchyard.common.errors import Reason, SwitchyardError, is_shutting_down, shutting_down
from switchyard.common.settings import Settings
from switchyard.router import service
from switchyard.router.plan import Planner, plan_response
from switchyard.router.service import (
    REGION_MAX_CHARS,
    REGION_PLANNERS,
    SUBSCRIBER_QUEUE,
    RouterServicer,
    RoutingState,
    _critical,
    follow_catalog_file,
    follow_health,
    routing_settings,
)
from switchyard.router.table import REGION_MIN_SAMPLES, RoutingTable, default_settings
from switchyard.v1 import common_pb2, health_pb2, health_pb2_grpc, router_pb2

URL = "http://127.0.0.1:9/v1"
CLOSED = health_pb2.BREAKER_STATE_CLOSED
OPEN = health_pb2.BREAKER_STATE_OPEN
HALF_OPEN = health_pb2.BREAKER_STATE_HALF_OPEN
HEALTHY = health_pb2.HEALTH_STATUS_HEALTHY
DEGRADED = health_pb2.HEALTH_STATUS_DEGRADED
DOWN = health_pb2.HEALTH_STATUS_DOWN
# A context the handlers never touch.
NO_CONTEXT: Any = None


def catalog_yaml(*, extra_models: str = "", rules: str = "") -> str:
    """Two equivalent small models on two providers; `extra_models` and `rules` edit it."""
    return (
        "providers:\n"
        f'  alpha: {{vendor: openai, base_url: "{URL}", region: us}}\n'
        f'  beta: {{vendor: anthropic, base_url: "{URL}", region: us}}\n'
        "models:\n"
        "  - {id: alpha/small, provider: alpha, upstream_model: a-small, category: small, quality: 70,\n"
        '     context_window: 8000, max_output_tokens: 1000, prices: {input: "0.2", output: "0.4"}}\n'
        "  - {id: beta/small, provider: beta, upstream_model: b-small, category: small, quality: 70,\n"
        '     context_window: 8000, max_output_tokens: 1000, prices: {input: "0.2", output: "0.4"}}\n'
        f"{extra_models}"
        "default_model: alpha/small\n"
        "tenants:\n"
        "  acme:\n"
        "    tier: pro\n"
        f"{rules}"
    )


CATALOG = parse_catalog(catalog_yaml())
BETA_LARGE = (
    "  - {id: beta/large, provider: beta, upstream_model: b-large, category: large, quality: 88,\n"
    '     context_window: 100000, max_output_tokens: 4000, prices: {input: "3", output: "15"}}\n'
)
PIN_BETA = "    routing_rules: [{name: pin-beta, then: {pin: beta/small}}]\n"
PIN_UNKNOWN = "    routing_rules: [{name: pin-nothing, then: {pin: nobody/nothing}}]\n"


def make_state(catalog: Catalog = CATALOG) -> RoutingState:
    return RoutingState(catalog, default_settings(), weight_floor=0.05)


def entry(
    model: str,
    *,
    breaker: health_pb2.BreakerState.ValueType = CLOSED,
    status: health_pb2.HealthStatus.ValueType = HEALTHY,
    latency_ms: float = 300.0,
    trials: int = 0,
) -> health_pb2.ModelHealth:
    return health_pb2.ModelHealth(
        provider=model.partition("/")[0],
        model=model,
        breaker=breaker,
        status=status,
        ewma_latency_ms=latency_ms,
        samples=20,
        half_open_trials=trials,
    )


def health_of(snapshot: router_pb2.RoutingSnapshot) -> dict[str, health_pb2.ModelHealth]:
    return {h.model: h for h in snapshot.health}


def chat(text: str = "hello there", model: str = "alpha/small") -> common_pb2.ChatRequest:
    return common_pb2.ChatRequest(
        model=model,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])],
    )


async def eventually(check: Callable[[], bool], *, timeout: float = 2.0) -> float:
    """Seconds until `check()` holds; fails the test after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def running(*coroutines: Coroutine[Any, Any, None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run the coroutines as tasks; cancel them (and collect their outcome) on the way out."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        await asyncio.sleep(0)  # let them start (run() takes its start time here)
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- RoutingState: versions and subscribers -------------------------------------------------


async def test_construction_builds_a_snapshot_versioned_in_wall_clock_milliseconds() -> None:
    before_ms = int(time.time() * 1000)
    state = make_state()
    after_ms = int(time.time() * 1000)
    assert state.version > 0
    assert before_ms <= state.version <= after_ms + 1
    assert state.snapshot.version == state.version
    assert [m.id for m in state.snapshot.models] == ["alpha/small", "beta/small"]
    assert list(state.snapshot.health) == []
    assert state.catalog is CATALOG
    assert state.planner.table.version == state.version


async def test_rebuild_bumps_the_version_strictly_even_when_the_clock_goes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = make_state()
    versions = [state.version] + [state.rebuild().version for _ in range(5)]
    assert all(later > earlier for earlier, later in zip(versions, versions[1:], strict=False))
    assert state.snapshot.version == state.version == versions[-1]
    # A wall clock far in the past (a restart on a host whose clock went back): still past the last.
    monkeypatch.setattr(service, "time", SimpleNamespace(time=lambda: 1000.0, monotonic=time.monotonic))
    last = state.version
    assert state.rebuild().version == last + 1
    assert state.rebuild().version == last + 2


async def test_a_subscriber_gets_the_current_snapshot_at_once_and_every_new_one() -> None:
    state = make_state()
    first = state.subscribe()
    assert first.qsize() == 1
    assert first.get_nowait() is state.snapshot
    rebuilt = state.rebuild()
    second = state.subscribe()
    assert second.get_nowait().version == rebuilt.version
    newest = state.rebuild()
    assert first.get_nowait() is rebuilt
    assert first.get_nowait() is newest
    assert second.get_nowait() is newest
    assert first.empty() and second.empty()


async def test_a_slow_subscriber_keeps_only_the_newest_snapshots_in_order() -> None:
    state = make_state()
    queue = state.subscribe()
    built: list[int] = []
    for _ in range(3 * SUBSCRIBER_QUEUE):
        built.append(state.rebuild().version)
        assert queue.qsize() <= SUBSCRIBER_QUEUE
    assert queue.qsize() == SUBSCRIBER_QUEUE
    held = [queue.get_nowait().version for _ in range(SUBSCRIBER_QUEUE)]
    assert held == built[-SUBSCRIBER_QUEUE:]
    assert held[-1] == state.version


async def test_unsubscribe_stops_delivery() -> None:
    state = make_state()
    kept, dropped = state.subscribe(), state.subscribe()
    kept.get_nowait(), dropped.get_nowait()
    state.unsubscribe(dropped)
    state.unsubscribe(dropped)  # a second time is harmless
    state.rebuild()
    assert dropped.empty()
    assert kept.get_nowait().version == state.version


# --- Which health changes are critical ------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "critical"),
    [
        pytest.param(None, entry("alpha/small"), False, id="new-closed-healthy"),
        pytest.param(None, entry("alpha/small", status=DEGRADED), False, id="new-closed-degraded"),
        pytest.param(None, entry("alpha/small", breaker=OPEN), True, id="new-open"),
        pytest.param(None, entry("alpha/small", breaker=HALF_OPEN, trials=2), True, id="new-half-open"),
        pytest.param(None, entry("alpha/small", status=DOWN), True, id="new-down"),
        pytest.param(entry("alpha/small"), entry("alpha/small", breaker=OPEN), True, id="breaker-opens"),
        pytest.param(entry("alpha/small", breaker=OPEN), entry("alpha/small"), True, id="breaker-closes"),
        pytest.param(entry("alpha/small"), entry("alpha/small", status=DEGRADED), True, id="status-change"),
        pytest.param(entry("alpha/small"), entry("alpha/small", latency_ms=900), False, id="latency-only"),
        pytest.param(entry("alpha/small"), entry("alpha/small"), False, id="identical"),
        pytest.param(
            entry("alpha/small", breaker=HALF_OPEN, trials=1),
            entry("alpha/small", breaker=HALF_OPEN, trials=3),
            True,
            id="half-open-trials",
        ),
    ],
)
def test_critical_truth_table(
    before: health_pb2.ModelHealth | None, after: health_pb2.ModelHealth, critical: bool
) -> None:
    assert _critical(before, after) is critical


def test_statistics_alone_are_never_critical() -> None:
    before = entry("alpha/small", breaker=HALF_OPEN, status=DEGRADED, trials=2)
    after = health_pb2.ModelHealth()
    after.CopyFrom(before)
    after.p95_latency_ms, after.error_rate, after.samples = 2500.0, 0.4, 999
    after.output_tokens_per_second, after.latency_base_ms, after.consecutive_failures = 55.0, 120.0, 3
    assert _critical(before, after) is False


# --- The rebuild task's pacing --------------------------------------------------------------


async def test_a_critical_update_reaches_a_snapshot_quickly() -> None:
    state = make_state()
    queue = state.subscribe()
    queue.get_nowait()
    start_version = state.version
    async with running(state.run()):
        state.update_health([entry("alpha/small", breaker=OPEN)])
        snapshot = await asyncio.wait_for(queue.get(), timeout=0.5)
    assert snapshot.version > start_version
    assert snapshot is state.snapshot
    assert health_of(snapshot)["alpha/small"].breaker == OPEN
    # The planner works on the new snapshot: the open model is no longer offered.
    servicer = RouterServicer(state)
    plan = await servicer.Plan(router_pb2.PlanRequest(request=chat(), tenant_id="acme"), NO_CONTEXT)
    assert [c.model for c in plan.candidates] == ["beta/small"]
    assert plan.snapshot_version == snapshot.version


async def test_changes_arriving_during_the_critical_delay_ride_along(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "CRITICAL_DELAY_S", 0.2)
    state = make_state()
    queue = state.subscribe()
    queue.get_nowait()
    async with running(state.run()):
        state.update_health([entry("alpha/small", breaker=OPEN)])
        await asyncio.sleep(0.02)
        assert queue.empty()  # still inside the delay
        state.update_health([entry("beta/small", status=DOWN)])
        snapshot = await asyncio.wait_for(queue.get(), timeout=1.0)
        assert set(health_of(snapshot)) == {"alpha/small", "beta/small"}
        await asyncio.sleep(0.05)
        assert queue.empty()  # one snapshot for both


async def test_statistics_wait_for_the_stats_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "STATS_INTERVAL_S", 0.25)
    state = make_state()
    state.update_health([entry("alpha/small", latency_ms=200)])
    queue = state.subscribe()
    queue.get_nowait()
    start_version = state.version
    async with running(state.run()):
        started = time.monotonic()
        await asyncio.sleep(0.05)
        assert queue.empty() and state.version == start_version
        snapshot = await asyncio.wait_for(queue.get(), timeout=1.5)
        first_at = time.monotonic()
        assert first_at - started >= 0.25 - 0.02
        assert health_of(snapshot)["alpha/small"].ewma_latency_ms == 200
        # The next statistics change, right after a rebuild, waits a whole interval again.
        state.update_health([entry("alpha/small", latency_ms=700)])
        await asyncio.sleep(0.05)
        assert queue.empty()
        snapshot = await asyncio.wait_for(queue.get(), timeout=1.5)
        assert time.monotonic() - first_at >= 0.25 - 0.02
        assert health_of(snapshot)["alpha/small"].ewma_latency_ms == 700


async def test_a_critical_change_flushes_pending_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "STATS_INTERVAL_S", 30.0)
    state = make_state()
    queue = state.subscribe()
    queue.get_nowait()
    async with running(state.run()):
        state.update_health([entry("beta/small", latency_ms=450)])
        await asyncio.sleep(0.08)
        assert queue.empty()
        state.update_health([entry("alpha/small", breaker=OPEN)])
        snapshot = await asyncio.wait_for(queue.get(), timeout=0.5)
    health = health_of(snapshot)
    assert health["alpha/small"].breaker == OPEN
    assert health["beta/small"].ewma_latency_ms == 450


async def test_replace_health_is_critical_only_when_it_changes_who_may_be_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service, "STATS_INTERVAL_S", 30.0)
    state = make_state()
    queue = state.subscribe()
    queue.get_nowait()
    both = [entry("alpha/small"), entry("beta/small")]
    async with running(state.run()):
        # New entries (the set of keys changed): critical.
        state.replace_health(both)
        snapshot = await asyncio.wait_for(queue.get(), timeout=0.5)
        assert set(health_of(snapshot)) == {"alpha/small", "beta/small"}
        # The same picture again, or only new statistics: no rebuild soon.
        state.replace_health([entry("alpha/small"), entry("beta/small")])
        state.replace_health([entry("alpha/small", latency_ms=800), entry("beta/small")])
        await asyncio.sleep(0.12)
        assert queue.empty()
        # An entry gone: critical, and the statistics ride along.
        state.replace_health([entry("alpha/small", latency_ms=900)])
        snapshot = await asyncio.wait_for(queue.get(), timeout=0.5)
    assert set(health_of(snapshot)) == {"alpha/small"}
    assert health_of(snapshot)["alpha/small"].ewma_latency_ms == 900


async def test_replace_health_with_a_breaker_change_is_critical(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "STATS_INTERVAL_S", 30.0)
    state = make_state()
    state.replace_health([entry("alpha/small"), entry("beta/small")])
    state.rebuild()
    queue = state.subscribe()
    queue.get_nowait()
    async with running(state.run()):
        state.replace_health([entry("alpha/small"), entry("beta/small", breaker=OPEN)])
        snapshot = await asyncio.wait_for(queue.get(), timeout=0.5)
    assert health_of(snapshot)["beta/small"].breaker == OPEN


# --- The catalog file follower --------------------------------------------------------------


def write_catalog(path: Path, text: str | bytes) -> None:
    """Write the file with a modification time past its last one, so the change is always seen."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    stamp = max(time.time_ns(), old + 1_000_000_000)
    os.utime(path, ns=(stamp, stamp))


async def test_follow_catalog_file_reloads_edits_and_keeps_the_last_good_catalog(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    write_catalog(path, catalog_yaml())
    state = make_state(load_catalog(path))
    original = state.catalog
    async with running(state.run(), follow_catalog_file(state, str(path), 0.05)) as tasks:
        # A new model and a tenant rule: a new catalog and, soon after, a snapshot with both.
        version = state.version
        write_catalog(path, catalog_yaml(extra_models=BETA_LARGE, rules=PIN_BETA))
        await eventually(lambda: state.catalog is not original)
        assert state.catalog.model("beta/large") is not None
        assert state.catalog.tenants["acme"].routing_rules[0]["then"] == {"pin": "beta/small"}
        await eventually(lambda: state.version > version, timeout=1.0)
        assert [m.id for m in state.snapshot.models] == ["alpha/small", "beta/small", "beta/large"]
        tenants = {t.tenant_id: t for t in state.snapshot.tenants}
        assert "pin-beta" in tenants["acme"].rules_json
        edited = state.catalog

        # A rule pinning an unknown model does not validate: the edited catalog stays.
        write_catalog(path, catalog_yaml(rules=PIN_UNKNOWN))
        await asyncio.sleep(0.2)
        assert state.catalog is edited
        assert not tasks[1].done()

        # The file removed: nothing changes; written again: reloaded (the follower still runs).
        path.unlink()
        await asyncio.sleep(0.1)
        assert state.catalog is edited and not tasks[1].done()
        write_catalog(path, catalog_yaml())
        await eventually(lambda: state.catalog is not edited)
        assert state.catalog.model("beta/large") is None
        assert state.catalog.tenants["acme"].routing_rules == ()


async def test_follow_catalog_file_loads_only_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    write_catalog(path, catalog_yaml())
    state = make_state()
    loads: list[str] = []

    def load(name: str) -> Catalog:
        loads.append(name)
        return load_catalog(name)

    async with running(follow_catalog_file(state, str(path), 0.02, load=load)):
        await asyncio.sleep(0.08)
        assert loads == []
        assert state.catalog is CATALOG
        write_catalog(path, catalog_yaml(extra_models=BETA_LARGE))
        await eventually(lambda: state.catalog is not CATALOG)
        await asyncio.sleep(0.05)
    assert loads == [str(path)]
    assert state.catalog.model("beta/large") is not None


async def test_follow_catalog_file_survives_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    write_catalog(path, catalog_yaml())
    state = make_state(load_catalog(path))
    original = state.catalog
    async with running(follow_catalog_file(state, str(path), 0.02)) as tasks:
        write_catalog(path, catalog_yaml().encode() + b"# caf\xe9 in latin-1\n")
        await asyncio.sleep(0.1)
        assert state.catalog is original
        assert not tasks[0].done(), tasks[0].exception()
        write_catalog(path, catalog_yaml(extra_models=BETA_LARGE))
        await eventually(lambda: state.catalog is not original, timeout=0.5)


# --- The RouterService handlers -------------------------------------------------------------


async def test_plan_and_explain_reject_a_request_without_messages() -> None:
    servicer = RouterServicer(make_state())
    empty = common_pb2.ChatRequest(model="alpha/small")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: servicer.Plan(router_pb2.PlanRequest(request=empty, tenant_id="acme"), NO_CONTEXT),
        lambda: servicer.Explain(router_pb2.ExplainRequest(request=empty, tenant_id="acme"), NO_CONTEXT),
        # Counted tokens do not make up for the missing messages.
        lambda: servicer.Plan(router_pb2.PlanRequest(request=empty, input_tokens=10), NO_CONTEXT),
    ]
    for call in calls:
        with pytest.raises(SwitchyardError) as caught:
            await call()
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.reason == Reason.INVALID_REQUEST
        assert caught.value.metadata == {"field": "request.messages"}


async def test_plan_returns_candidates_on_the_current_snapshot() -> None:
    state = make_state()
    servicer = RouterServicer(state)
    plan = await servicer.Plan(router_pb2.PlanRequest(request=chat(), tenant_id="acme"), NO_CONTEXT)
    assert [(c.model, c.provider, c.upstream_model) for c in plan.candidates] == [
        ("alpha/small", "alpha", "a-small"),
        ("beta/small", "beta", "b-small"),
    ]
    assert plan.candidates[0].reason == "requested model"
    assert plan.snapshot_version == state.version
    assert plan.candidates[0].predicted_cost_micros > 0


async def test_plan_follows_a_new_catalogs_tenant_rules() -> None:
    state = make_state()
    servicer = RouterServicer(state)
    state.set_catalog(parse_catalog(catalog_yaml(rules=PIN_BETA)))
    assert state.catalog.tenants["acme"].routing_rules  # the catalog is in force at once...
    state.rebuild()  # ...and plans follow with the next snapshot
    plan = await servicer.Plan(router_pb2.PlanRequest(request=chat(), tenant_id="acme"), NO_CONTEXT)
    assert plan.candidates[0].model == "beta/small"
    assert plan.matched_rule != ""


async def test_explain_uses_the_callers_token_count() -> None:
    state = make_state()
    servicer = RouterServicer(state)
    roomy = await servicer.Explain(
        router_pb2.ExplainRequest(request=chat(), tenant_id="acme", input_tokens=100), NO_CONTEXT
    )
    assert roomy.snapshot_version == state.version
    assert {r.candidate.model: (r.filtered, r.rank) for r in roomy.rows} == {
        "alpha/small": (False, 1),
        "beta/small": (False, 2),
    }
    # 100 000 prompt tokens fit neither 8 000-token context window.
    crowded = await servicer.Explain(
        router_pb2.ExplainRequest(request=chat(), tenant_id="acme", input_tokens=100_000), NO_CONTEXT
    )
    assert [r.candidate.model for r in crowded.rows] == ["alpha/small", "beta/small"]
    assert all(r.filtered and "context window" in r.filter_reason for r in crowded.rows)
    # Counted by the router when the caller did not: a short prompt fits.
    counted = await servicer.Explain(router_pb2.ExplainRequest(request=chat(), tenant_id="acme"), NO_CONTEXT)
    assert not any(r.filtered for r in counted.rows)


async def test_watch_routes_streams_the_current_snapshot_then_new_ones_and_unsubscribes() -> None:
    state = make_state()
    servicer = RouterServicer(state)
    stream = cast(
        AsyncGenerator[router_pb2.WatchRoutesResponse, None],
        servicer.WatchRoutes(router_pb2.WatchRoutesRequest(subscriber_id="edge-1"), NO_CONTEXT),
    )
    first = await asyncio.wait_for(anext(stream), timeout=0.5)
    assert first.snapshot == state.snapshot
    rebuilt = state.rebuild()
    second = await asyncio.wait_for(anext(stream), timeout=0.5)
    assert second.snapshot.version == rebuilt.version > first.snapshot.version
    assert len(state._subscribers) == 1
    await stream.aclose()
    assert len(state._subscribers) == 0


def test_routing_settings_come_from_the_settings() -> None:
    values = Settings(router_equal_score_band=0.2, router_weight_floor=0.1, router_headroom_reserve=0.03)
    assert routing_settings(values) == router_pb2.RoutingSettings(
        max_candidates=3, equal_score_band=0.2, weight_floor=0.1, headroom_reserve=0.03
    )


# --- The health monitor follower ------------------------------------------------------------

Step = health_pb2.WatchResponse | BaseException | asyncio.Event


class FakeHealthStub:
    """`Watch` plays one script per call: events, errors to raise, and gates to wait on. A call
    whose script is an exception raises it at once; after the last script the stream hangs."""

    def __init__(self, scripts: Sequence[BaseException | Sequence[Step]]) -> None:
        self._scripts = list(scripts)
        self.requests: list[health_pb2.WatchRequest] = []

    def Watch(self, request: health_pb2.WatchRequest) -> AsyncIterator[health_pb2.WatchResponse]:
        self.requests.append(request)
        script = self._scripts.pop(0) if self._scripts else [asyncio.Event()]
        if isinstance(script, BaseException):
            raise script
        return self._play(script)

    async def _play(self, script: Sequence[Step]) -> AsyncIterator[health_pb2.WatchResponse]:
        for step in script:
            if isinstance(step, asyncio.Event):
                await step.wait()
            elif isinstance(step, BaseException):
                raise step
            else:
                yield step


def record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The service's sleeps, recorded and made instant (follow_health only sleeps to back off)."""
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(service, "asyncio", SimpleNamespace(sleep=sleep))
    return delays


def as_stub(stub: FakeHealthStub) -> health_pb2_grpc.HealthMonitorServiceStub:
    return cast(health_pb2_grpc.HealthMonitorServiceStub, stub)


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())


def snapshot_event(*entries: health_pb2.ModelHealth) -> health_pb2.WatchResponse:
    return health_pb2.WatchResponse(snapshot=health_pb2.HealthSnapshot(version=1, entries=entries))


def update_event(*entries: health_pb2.ModelHealth) -> health_pb2.WatchResponse:
    return health_pb2.WatchResponse(update=health_pb2.HealthUpdate(version=2, entries=entries))


async def test_follow_health_applies_snapshots_and_updates_and_reconnects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = 0.02
    monkeypatch.setattr(service, "RECONNECT_BASE_S", base)
    state = make_state()
    delays = record_sleeps(monkeypatch)
    lose_stream, monitor_back = asyncio.Event(), asyncio.Event()
    stub = FakeHealthStub(
        [
            [
                snapshot_event(entry("alpha/small"), entry("beta/small", latency_ms=300)),
                update_event(entry("beta/small", latency_ms=650)),
                lose_stream,
                unavailable(),
            ],
            unavailable(),  # the monitor still unreachable on the first retry
            [monitor_back, snapshot_event(entry("beta/small", breaker=OPEN)), unavailable()],
            # then a stream that hangs
        ]
    )

    def picture() -> dict[str, tuple[int, float]]:
        return {m: (h.breaker, h.ewma_latency_ms) for m, h in health_of(state.rebuild()).items()}

    async with running(follow_health(state, as_stub(stub), "router-test")) as tasks:
        # The snapshot replaced the (empty) picture, then the update changed one entry of it.
        await eventually(lambda: picture() == {"alpha/small": (CLOSED, 300.0), "beta/small": (CLOSED, 650.0)})
        assert len(stub.requests) == 1 and delays == []
        # The stream lost, and the first retry failing: the last picture stays in force.
        lose_stream.set()
        await eventually(lambda: len(stub.requests) == 3)
        assert picture() == {"alpha/small": (CLOSED, 300.0), "beta/small": (CLOSED, 650.0)}
        # Reconnected: the monitor's new snapshot replaces the whole picture.
        monitor_back.set()
        await eventually(lambda: len(stub.requests) == 4)
        assert picture() == {"beta/small": (OPEN, 300.0)}
        assert not tasks[0].done()
    assert [r.subscriber_id for r in stub.requests] == ["router-test"] * 4
    # Backing off: twice the base after one failure, four times after two in a row; an event
    # received resets the count, so the third loss waits twice the base again.
    assert delays == pytest.approx([2 * base, 4 * base, 2 * base])


async def test_follow_health_backs_off_exponentially_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "RECONNECT_BASE_S", 0.01)
    monkeypatch.setattr(service, "RECONNECT_CAP_S", 0.05)
    state = make_state()
    delays = record_sleeps(monkeypatch)
    stub = FakeHealthStub([unavailable() for _ in range(5)])
    async with running(follow_health(state, as_stub(stub), "r")):
        await eventually(lambda: len(stub.requests) == 6)
    assert delays == pytest.approx([0.02, 0.04, 0.05, 0.05, 0.05])
    assert list(state.rebuild().health) == []


async def test_follow_health_reconnects_after_the_stream_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "RECONNECT_BASE_S", 0.01)
    state = make_state()
    delays = record_sleeps(monkeypatch)
    stub = FakeHealthStub(
        [
            [snapshot_event(entry("alpha/small", breaker=OPEN))],  # ends without an error
            [update_event(entry("beta/small", status=DOWN))],
        ]
    )
    async with running(follow_health(state, as_stub(stub), "r")):
        await eventually(lambda: len(stub.requests) == 3)
    assert delays == pytest.approx([0.01, 0.01])
    health = health_of(state.rebuild())
    assert (health["alpha/small"].breaker, health["beta/small"].status) == (OPEN, DOWN)


class RecordingLog:
    """Stands in for the module's structlog logger."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append(("warning", event, fields))


def refused_as_shutting_down() -> grpc.aio.AioRpcError:
    refusal = shutting_down("health monitor")
    return grpc.aio.AioRpcError(
        refusal.code, grpc.aio.Metadata(), grpc.aio.Metadata(*refusal.trailing_metadata()), refusal.message
    )


async def test_follow_health_takes_a_monitor_going_away_as_no_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A draining monitor ends its stream cleanly and refuses new ones as shutting down: the
    # router resubscribes after the base delay (backing off only if that repeats), logged at
    # info; a monitor that is then unreachable is the loss worth a warning.
    monkeypatch.setattr(service, "RECONNECT_BASE_S", 0.01)
    log = RecordingLog()
    monkeypatch.setattr(service, "log", log)
    state = make_state()
    delays = record_sleeps(monkeypatch)
    stub = FakeHealthStub(
        [
            [snapshot_event(entry("alpha/small"))],  # ends without an error
            refused_as_shutting_down(),
            unavailable(),
            [snapshot_event(entry("beta/small"))],
        ]
    )
    async with running(follow_health(state, as_stub(stub), "r")):
        await eventually(lambda: len(stub.requests) == 5)
    assert delays == pytest.approx([0.01, 0.02, 0.08, 0.01])
    assert log.events == [
        ("info", "health_watch_ended", {"status": "ENDED"}),
        ("info", "health_watch_ended", {"status": "SHUTTING_DOWN"}),
        ("warning", "health_watch_lost", {"status": "UNAVAILABLE"}),
        ("info", "health_watch_resumed", {}),
        ("info", "health_watch_ended", {"status": "ENDED"}),
    ]


async def test_watch_routes_ends_when_the_router_drains_and_refuses_new_subscribers() -> None:
    state = make_state()
    servicer = RouterServicer(state)
    stream = cast(
        AsyncGenerator[router_pb2.WatchRoutesResponse, None],
        servicer.WatchRoutes(router_pb2.WatchRoutesRequest(subscriber_id="edge-1"), NO_CONTEXT),
    )
    assert (await asyncio.wait_for(anext(stream), timeout=0.5)).snapshot == state.snapshot
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    rebuilt = state.rebuild()  # queued before the drain: still sent
    servicer.drain()
    assert (await asyncio.wait_for(waiting, timeout=0.5)).snapshot == rebuilt
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), timeout=0.5)
    assert len(state._subscribers) == 0
    late = servicer.WatchRoutes(router_pb2.WatchRoutesRequest(subscriber_id="edge-2"), NO_CONTEXT)
    with pytest.raises(SwitchyardError) as caught:
        await anext(cast(AsyncGenerator[router_pb2.WatchRoutesResponse, None], late))
    assert is_shutting_down(caught.value)


# --- Plan and Explain from a region -----------------------------------------------------------

# Three interchangeable models (same price, quality and catalog region): only latency sets them apart.
GEO_CATALOG = parse_catalog(
    "providers:\n"
    f'  near: {{vendor: openai, base_url: "{URL}", region: us}}\n'
    f'  mid: {{vendor: anthropic, base_url: "{URL}", region: us}}\n'
    f'  far: {{vendor: mistral, base_url: "{URL}", region: us}}\n'
    "models:\n"
    + "".join(
        f"  - {{id: {p}/m, provider: {p}, upstream_model: m, category: small, quality: 70,\n"
        '     context_window: 8000, max_output_tokens: 500, prices: {input: "0.2", output: "0.4"}}\n'
        for p in ("near", "mid", "far")
    )
    + "tenants:\n  acme:\n    tier: pro\n"
)
# Milliseconds each model takes as measured from each region; "ap" has too few samples to trust.
REGIONAL_MS = {
    "us": {"near/m": 100.0, "mid/m": 300.0, "far/m": 900.0},
    "eu": {"near/m": 900.0, "mid/m": 300.0, "far/m": 100.0},
}
SPARSE = "ap"
# Over every region together: the mean of the two.
GLOBAL_MS = {"near/m": 500.0, "mid/m": 300.0, "far/m": 500.0}


def regional_entry(model: str, *, scale: float = 1.0) -> health_pb2.ModelHealth:
    """The health monitor's entry for `model`: a global latency fit and one per region."""

    def region(name: str, ms: float, samples: int) -> health_pb2.RegionLatency:
        return health_pb2.RegionLatency(region=name, samples=samples, ewma_latency_ms=ms, latency_base_ms=ms)

    regions = [region(name, ms[model] * scale, REGION_MIN_SAMPLES) for name, ms in REGIONAL_MS.items()]
    regions.append(region(SPARSE, 50.0, REGION_MIN_SAMPLES - 1))
    return health_pb2.ModelHealth(
        provider=model.partition("/")[0],
        model=model,
        breaker=CLOSED,
        status=HEALTHY,
        samples=2 * REGION_MIN_SAMPLES,
        ewma_latency_ms=GLOBAL_MS[model] * scale,
        latency_base_ms=GLOBAL_MS[model] * scale,
        latency_fit_samples=2 * REGION_MIN_SAMPLES,
        regions=regions,
    )


def geo_state(*, scale: float = 1.0) -> RoutingState:
    state = make_state(GEO_CATALOG)
    state.replace_health([regional_entry(model, scale=scale) for model in GLOBAL_MS])
    state.rebuild()
    return state


def fastest_first(text: str = "hi") -> common_pb2.ChatRequest:
    """An `auto` request under the latency preference."""
    request = chat(text, model="auto")
    request.routing.CopyFrom(
        common_pb2.RoutingHints(
            task_type=common_pb2.TASK_TYPE_SIMPLE_CHAT, preference=common_pb2.ROUTING_PREFERENCE_LATENCY
        )
    )
    return request


async def plan_from(
    servicer: RouterServicer, request: common_pb2.ChatRequest, region: str
) -> router_pb2.PlanResponse:
    return await servicer.Plan(
        router_pb2.PlanRequest(request=request, tenant_id="acme", region=region), NO_CONTEXT
    )


async def test_plan_predicts_latency_as_measured_from_the_requested_region() -> None:
    servicer = RouterServicer(geo_state())

    async def predicted(model: str, region: str) -> int:
        plan = await plan_from(servicer, chat(model=model), region)
        assert plan.candidates[0].model == model
        return plan.candidates[0].predicted_latency_ms

    assert await predicted("near/m", "") == 500
    assert await predicted("near/m", "us") == 100  # near from us: faster than every region together
    assert await predicted("near/m", "eu") == 900  # and slower from eu
    assert await predicted("far/m", "eu") == 100
    # Fewer than REGION_MIN_SAMPLES from "ap", nothing from "sa": the global figure stands.
    assert await predicted("near/m", SPARSE) == 500
    assert await predicted("near/m", "sa") == 500


async def test_the_latency_preference_ranks_by_the_requested_regions_latency() -> None:
    servicer = RouterServicer(geo_state())
    us = await plan_from(servicer, fastest_first(), "us")
    eu = await plan_from(servicer, fastest_first(), "eu")
    everywhere = await plan_from(servicer, fastest_first(), "")
    assert [c.model for c in us.candidates] == ["near/m", "mid/m", "far/m"]
    assert [c.model for c in eu.candidates] == ["far/m", "mid/m", "near/m"]
    # Seen from every region at once, the model that is never slow leads.
    assert everywhere.candidates[0].model == "mid/m"
    explained = await servicer.Explain(
        router_pb2.ExplainRequest(request=fastest_first(), tenant_id="acme", region="eu"), NO_CONTEXT
    )
    assert sorted((r.rank, r.candidate.model) for r in explained.rows) == [
        (1, "far/m"),
        (2, "mid/m"),
        (3, "near/m"),
    ]


async def test_a_regions_plan_is_what_an_edge_in_that_region_computes() -> None:
    state = geo_state()
    servicer = RouterServicer(state)
    for region in ("us", "eu", SPARSE, ""):
        # An edge in `region` compiles the same snapshot for its region and plans with the library.
        edge = Planner(RoutingTable.from_snapshot(state.snapshot, region=region))
        for request in (fastest_first(), chat(model="near/m"), fastest_first("a longer question?")):
            tokens, window = servicer._input_tokens(request, 0)  # what the router counts for it
            plan = await plan_from(servicer, request, region)
            assert plan == plan_response(
                edge.plan(request, tenant_id="acme", input_tokens=tokens, context_tokens=window)
            )
            explained = await servicer.Explain(
                router_pb2.ExplainRequest(request=request, tenant_id="acme", region=region), NO_CONTEXT
            )
            assert (
                explained
                == edge.explain(
                    request, tenant_id="acme", input_tokens=tokens, context_tokens=window
                ).to_proto()
            )
            assert plan.snapshot_version == explained.snapshot_version == state.version


async def test_a_regions_plan_follows_new_snapshots() -> None:
    state = geo_state()
    servicer = RouterServicer(state)
    first = await plan_from(servicer, chat(model="near/m"), "us")
    assert first.candidates[0].predicted_latency_ms == 100
    # The health monitor now sees everything three times slower: the next snapshot carries it.
    state.replace_health([regional_entry(model, scale=3.0) for model in GLOBAL_MS])
    state.rebuild()
    second = await plan_from(servicer, chat(model="near/m"), "us")
    assert second.snapshot_version == state.version > first.snapshot_version
    assert second.candidates[0].predicted_latency_ms == 300


async def test_regional_planners_are_kept_per_region_and_bounded() -> None:
    state = geo_state()
    us = state.planner_for("us")
    assert state.planner_for("us") is us
    assert state.planner_for("") is state.planner
    # Kept across snapshots (round robin and half-open trials carry over, as on an edge)...
    state.rebuild()
    assert state.planner_for("us") is us
    assert us.table.version == state.version and us.table.region == "us"
    # ...but only the REGION_PLANNERS most recently asked for.
    for n in range(REGION_PLANNERS + 5):
        state.planner_for(f"r{n}")
    assert len(state._regional) == REGION_PLANNERS
    assert "us" not in state._regional
    assert f"r{REGION_PLANNERS + 4}" in state._regional


async def test_plan_and_explain_reject_an_invalid_region() -> None:
    servicer = RouterServicer(geo_state())
    for region in ("x" * (REGION_MAX_CHARS + 1), "eu west", "eu/west", "eu\n", "région", "us;drop"):
        plan = router_pb2.PlanRequest(request=chat(model="near/m"), region=region)
        explain = router_pb2.ExplainRequest(request=chat(model="near/m"), region=region)
        for call in (servicer.Plan(plan, NO_CONTEXT), servicer.Explain(explain, NO_CONTEXT)):
            with pytest.raises(SwitchyardError) as caught:
                await call
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.reason == Reason.INVALID_REQUEST
            assert caught.value.metadata == {"field": "region"}
    # Names of any usual shape pass.
    for region in ("x" * REGION_MAX_CHARS, "eu-west-1", "us_east.2", "AP"):
        assert (await plan_from(servicer, chat(model="near/m"), region)).candidates
