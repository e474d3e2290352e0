"""The edge's route watcher against a fake router: snapshots swap the planner's table, stale
ones are ignored, and a lost stream is reconnected with backoff and reported."""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import grpc
import pytest

from switchyard.common.catalog import parse_catalog
from switchyard.common.errors import shutting_down
from switchyard.edge import routes
from switchyard.edge.routes import RECONNECT_BASE_S, RECONNECT_CAP_S, RouteSource, RouteWatcher
from switchyard.router.plan import Planner
from switchyard.router.table import RoutingTable, build_snapshot
from switchyard.v1 import common_pb2, health_pb2, router_pb2

_real_sleep = asyncio.sleep
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
URL = "http://127.0.0.1:9/v1"

CATALOG = parse_catalog(
    f"""
providers:
  alpha: {{vendor: openai, base_url: "{URL}", region: us}}
  beta: {{vendor: openai_compatible, base_url: "{URL}", region: us}}
models:
  - {{id: alpha/m, provider: alpha, upstream_model: m, context_window: 8000, max_output_tokens: 500,
     prices: {{input: "0.2", output: "0.4"}}, category: small, quality: 70}}
  - {{id: beta/m, provider: beta, upstream_model: m, context_window: 8000, max_output_tokens: 500,
     prices: {{input: "0.2", output: "0.4"}}, category: small, quality: 70}}
"""
)
ALPHA_OPEN = health_pb2.ModelHealth(provider="alpha", model="alpha/m", breaker=health_pb2.BREAKER_STATE_OPEN)

# What the fake stream yields: a response, an error to raise, or None for a clean end.
Item = router_pb2.WatchRoutesResponse | BaseException | None


def _down() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())


def _shutting_down() -> grpc.aio.AioRpcError:
    """A draining router's refusal of a new WatchRoutes call, as the edge receives it."""
    refusal = shutting_down("router")
    return grpc.aio.AioRpcError(
        refusal.code, grpc.aio.Metadata(), grpc.aio.Metadata(*refusal.trailing_metadata()), refusal.message
    )


def snapshot(version: int, health: Iterable[health_pb2.ModelHealth] = ()) -> router_pb2.RoutingSnapshot:
    return build_snapshot(CATALOG, version=version, health=health, now=NOW)


def response(version: int, health: Iterable[health_pb2.ModelHealth] = ()) -> router_pb2.WatchRoutesResponse:
    return router_pb2.WatchRoutesResponse(snapshot=snapshot(version, health))


async def until(condition: Callable[[], bool], timeout_s: float = 1.0) -> None:
    """Wait until `condition()` holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await _real_sleep(0.002)


class FakeCall:
    """A server-streaming call: yields what is pushed, raises pushed errors, ends on None."""

    def __init__(self, items: Sequence[Item] = ()) -> None:
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        for entry in items:
            self.queue.put_nowait(entry)
        self.cancelled = False

    def push(self, entry: Item) -> None:
        self.queue.put_nowait(entry)

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> router_pb2.WatchRoutesResponse:
        entry = await self.queue.get()
        if entry is None:
            raise StopAsyncIteration
        if isinstance(entry, BaseException):
            raise entry
        return entry

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeRouter:
    """Hands out one `FakeCall` per `WatchRoutes`, pre-loaded from `script` while it lasts."""

    def __init__(self, *script: Sequence[Item]) -> None:
        self.script = list(script)
        self.requests: list[router_pb2.WatchRoutesRequest] = []
        self.calls: list[FakeCall] = []

    def WatchRoutes(
        self, request: router_pb2.WatchRoutesRequest, *, timeout: float | None = None
    ) -> FakeCall:
        self.requests.append(request)
        call = FakeCall(self.script.pop(0) if self.script else ())
        self.calls.append(call)
        return call


class RecordingLog:
    """Stands in for the module's structlog logger."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append(("warning", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.events.append(("info", event, fields))


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> RecordingLog:
    recording = RecordingLog()
    monkeypatch.setattr(routes, "log", recording)
    return recording


@pytest.fixture
def fast_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "RECONNECT_BASE_S", 0.001)


def record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make the watcher's own sleeps instant and record how long each would have been."""
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await _real_sleep(0)

    patched = types.SimpleNamespace(**{**vars(asyncio), "sleep": sleep})
    monkeypatch.setattr(routes, "asyncio", patched)
    return delays


def make(router: FakeRouter | None = None) -> tuple[RouteWatcher, Planner]:
    planner = Planner(RoutingTable.from_catalog(CATALOG))
    return RouteWatcher(cast(RouteSource, router or FakeRouter()), planner, "edge-1"), planner


def planned(planner: Planner) -> list[str]:
    request = common_pb2.ChatRequest(
        model="auto",
        messages=[
            common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="hello")])
        ],
    )
    return sorted(c.model for c in planner.plan(request, now=NOW).candidates)


def watcher_tasks() -> int:
    return [t.get_name() for t in asyncio.all_tasks()].count("route-watcher")


# --- apply and wait_for_snapshot -----------------------------------------------------------------


def test_reconnect_constants() -> None:
    assert (RECONNECT_BASE_S, RECONNECT_CAP_S) == (0.2, 5.0)


async def test_starts_on_the_catalog_at_version_zero_not_connected() -> None:
    watcher, planner = make()
    assert watcher.version == 0 == planner.table.version
    assert watcher.connected is False and watcher.snapshots == 0
    await _real_sleep(0.005)
    assert watcher.stale_for_s > 0.0
    assert planned(planner) == ["alpha/m", "beta/m"]


async def test_a_newer_snapshot_swaps_the_planners_table() -> None:
    watcher, planner = make()
    assert watcher.apply(snapshot(1, [ALPHA_OPEN])) is True
    assert planner.table.version == 1 == watcher.version
    assert watcher.snapshots == 1
    # The snapshot's open breaker takes alpha out of plans.
    assert planned(planner) == ["beta/m"]
    assert watcher.apply(snapshot(2)) is True
    assert planner.table.version == 2 and watcher.snapshots == 2
    assert planned(planner) == ["alpha/m", "beta/m"]


async def test_an_older_or_equal_snapshot_is_ignored() -> None:
    watcher, planner = make()
    assert watcher.apply(snapshot(0, [ALPHA_OPEN])) is False  # same version as the catalog's table
    assert watcher.apply(snapshot(5, [ALPHA_OPEN])) is True
    table = planner.table
    assert watcher.apply(snapshot(5)) is False
    assert watcher.apply(snapshot(4)) is False
    assert planner.table is table and watcher.version == 5 and watcher.snapshots == 1
    assert planned(planner) == ["beta/m"]


async def test_wait_for_snapshot_times_out_without_one_and_returns_at_once_after_one() -> None:
    watcher, _ = make()
    started = time.monotonic()
    assert await watcher.wait_for_snapshot(0.02) is False
    assert time.monotonic() - started >= 0.015
    assert watcher.apply(snapshot(0)) is False
    assert await watcher.wait_for_snapshot(0.0) is False  # an ignored snapshot does not count
    watcher.apply(snapshot(1))
    started = time.monotonic()
    assert await watcher.wait_for_snapshot(5.0) is True
    assert time.monotonic() - started < 1.0


async def test_wait_for_snapshot_wakes_when_the_stream_delivers() -> None:
    router = FakeRouter()
    watcher, _ = make(router)
    watcher.start()
    try:
        waiting = asyncio.create_task(watcher.wait_for_snapshot(2.0))
        await until(lambda: len(router.calls) == 1)
        await _real_sleep(0.005)
        assert not waiting.done()
        router.calls[0].push(response(3))
        assert await waiting is True
        assert watcher.version == 3
    finally:
        await watcher.aclose()


# --- following the stream ------------------------------------------------------------------------


async def test_follows_the_stream_and_plans_on_each_newer_snapshot() -> None:
    router = FakeRouter()
    watcher, planner = make(router)
    watcher.start()
    try:
        await until(lambda: len(router.calls) == 1)
        first = router.requests[0]
        assert (first.subscriber_id, first.known_version) == ("edge-1", 0)
        assert watcher.connected is False  # no message yet
        call = router.calls[0]
        call.push(response(3))
        assert await watcher.wait_for_snapshot(1.0) is True
        assert watcher.connected is True and watcher.stale_for_s == 0.0
        assert (watcher.version, watcher.snapshots) == (3, 1)
        call.push(response(2, [ALPHA_OPEN]))  # older: ignored
        call.push(response(4, [ALPHA_OPEN]))
        await until(lambda: watcher.version == 4)
        assert watcher.snapshots == 2
        assert planned(planner) == ["beta/m"]
        assert len(router.calls) == 1 and not call.cancelled
    finally:
        await watcher.aclose()


async def test_a_lost_stream_is_reconnected_from_the_current_version(
    fast_reconnect: None, log: RecordingLog
) -> None:
    router = FakeRouter([response(5, [ALPHA_OPEN]), _down()])
    watcher, planner = make(router)
    watcher.start()
    try:
        await until(lambda: len(router.calls) == 2)
        assert router.calls[0].cancelled is True
        assert router.requests[1].known_version == 5
        assert router.requests[1].subscriber_id == "edge-1"
        # Disconnected, still planning on the last snapshot, and getting staler.
        assert watcher.connected is False
        stale = watcher.stale_for_s
        assert stale > 0.0
        await _real_sleep(0.01)
        assert watcher.stale_for_s >= stale + 0.009
        assert watcher.version == 5 and planned(planner) == ["beta/m"]
        router.calls[1].push(response(6))
        await until(lambda: watcher.version == 6)
        assert watcher.connected is True and watcher.stale_for_s == 0.0
        assert planned(planner) == ["alpha/m", "beta/m"]
    finally:
        await watcher.aclose()
    assert log.events == [
        ("warning", "routes_lost", {"status": "UNAVAILABLE", "version": 5}),
        ("info", "routes_resumed", {"version": 6}),
    ]


async def test_reconnects_back_off_up_to_the_cap_and_log_the_loss_once(
    monkeypatch: pytest.MonkeyPatch, log: RecordingLog
) -> None:
    delays = record_sleeps(monkeypatch)
    router = FakeRouter(*([_down()] for _ in range(7)))
    watcher, _ = make(router)
    watcher.start()
    try:
        await until(lambda: len(router.calls) == 8)
        assert [r.known_version for r in router.requests] == [0] * 8
        assert watcher.connected is False
        assert delays == pytest.approx(
            [0.4, 0.8, 1.6, 3.2, RECONNECT_CAP_S, RECONNECT_CAP_S, RECONNECT_CAP_S]
        )
        assert log.events == [("warning", "routes_lost", {"status": "UNAVAILABLE", "version": 0})]
        # Back: the failure count starts over, so the next loss waits the shortest time again.
        router.calls[7].push(response(2))
        await until(lambda: watcher.connected)
        assert log.events[-1] == ("info", "routes_resumed", {"version": 2})
        router.calls[7].push(_down())
        await until(lambda: len(router.calls) == 9)
        assert delays[7:] == pytest.approx([0.4])
        assert router.requests[8].known_version == 2
        assert log.events[-1] == ("warning", "routes_lost", {"status": "UNAVAILABLE", "version": 2})
    finally:
        await watcher.aclose()


async def test_a_cleanly_ended_stream_is_reconnected(fast_reconnect: None) -> None:
    router = FakeRouter([response(1), None])
    watcher, _ = make(router)
    watcher.start()
    try:
        await until(lambda: len(router.calls) == 2)
        assert router.calls[0].cancelled is True
        assert router.requests[1].known_version == 1
        assert watcher.connected is False and watcher.stale_for_s > 0.0
    finally:
        await watcher.aclose()


@pytest.mark.parametrize("end", ["clean", "shutting_down"])
async def test_a_router_going_away_is_resubscribed_after_the_base_delay_and_logged_at_info(
    monkeypatch: pytest.MonkeyPatch, log: RecordingLog, end: str
) -> None:
    # A draining router ends its streams cleanly and refuses new ones as shutting down: the
    # edge resubscribes (through the proxy, to another replica) after the shortest delay.
    delays = record_sleeps(monkeypatch)
    ending: Item = None if end == "clean" else _shutting_down()
    router = FakeRouter([response(1), ending])
    watcher, _ = make(router)
    watcher.start()
    try:
        await until(lambda: len(router.calls) == 2)
        assert router.requests[1].known_version == 1
        router.calls[1].push(response(2))
        await until(lambda: watcher.version == 2)
        assert watcher.connected
    finally:
        await watcher.aclose()
    status = "ENDED" if end == "clean" else "SHUTTING_DOWN"
    assert log.events == [
        ("info", "routes_stream_ended", {"status": status, "version": 1}),
        ("info", "routes_resumed", {"version": 2}),
    ]
    assert delays == pytest.approx([RECONNECT_BASE_S])


async def test_a_router_gone_for_good_after_a_clean_end_is_a_loss_that_backs_off(
    monkeypatch: pytest.MonkeyPatch, log: RecordingLog
) -> None:
    delays = record_sleeps(monkeypatch)
    router = FakeRouter([response(1), None], [_shutting_down()], [_down()], [_down()])
    watcher, _ = make(router)
    watcher.start()
    try:
        await until(lambda: len(router.calls) == 5)
    finally:
        await watcher.aclose()
    assert log.events == [
        ("info", "routes_stream_ended", {"status": "ENDED", "version": 1}),
        ("info", "routes_stream_ended", {"status": "SHUTTING_DOWN", "version": 1}),
        ("warning", "routes_lost", {"status": "UNAVAILABLE", "version": 1}),
    ]
    assert delays == pytest.approx([0.2, 0.4, 1.6, 3.2])


async def test_start_twice_runs_one_watcher_and_aclose_stops_it() -> None:
    router = FakeRouter()
    watcher, _ = make(router)
    watcher.start()
    watcher.start()
    await until(lambda: len(router.calls) == 1)
    assert watcher_tasks() == 1
    await watcher.aclose()
    assert watcher_tasks() == 0
    assert router.calls[0].cancelled is True
    await _real_sleep(0.01)
    assert len(router.calls) == 1
    await watcher.aclose()  # a second close is harmless
