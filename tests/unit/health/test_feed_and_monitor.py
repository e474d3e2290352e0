"""The in-memory outcome feed, report validation, and the health monitor: broadcasting changes to
watchers, starting a watcher over when it falls behind, warming up from and following the feed, and the
servicer's Report, Snapshot and Watch."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

import grpc
import pytest

from switchyard.common.errors import Reason, SwitchyardError
from switchyard.health.book import HealthBook, HealthConfig
from switchyard.health.feed import _MEMORY_HISTORY, MemoryFeed, build_feed
from switchyard.health.service import (
    MAX_NAME_CHARS,
    MAX_REPORT_OUTCOMES,
    WATCH_QUEUE,
    HealthMonitor,
    HealthMonitorServicer,
    validate_report,
)
from switchyard.v1 import health_pb2

START = 1_000.0
T = TypeVar("T")


class FakeClock:
    """Seconds that only move when a test says so."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ok(provider: str = "openai", model: str = "gpt-4o", latency_ms: int = 100) -> health_pb2.AttemptOutcome:
    return health_pb2.AttemptOutcome(
        provider=provider, model=model, success=True, total_latency_ms=latency_ms
    )


def failed(
    reason: str = "PROVIDER_UNAVAILABLE", provider: str = "openai", model: str = "gpt-4o"
) -> health_pb2.AttemptOutcome:
    return health_pb2.AttemptOutcome(provider=provider, model=model, success=False, error_reason=reason)


async def next_of(iterator: AsyncIterator[T]) -> T:
    return await asyncio.wait_for(anext(iterator), timeout=2)


def make_monitor(
    fake: FakeClock, feed: MemoryFeed | None = None, **config: Any
) -> tuple[HealthMonitor, MemoryFeed]:
    feed = feed if feed is not None else MemoryFeed(clock=lambda: fake.now)
    return HealthMonitor(HealthBook(HealthConfig(**config), clock=lambda: fake.now), feed), feed


def drain(queue: asyncio.Queue[Any]) -> list[Any]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


# --- MemoryFeed ---------------------------------------------------------------------------------


async def test_memory_feed_delivers_each_batch_to_every_subscriber_in_order() -> None:
    feed = MemoryFeed()
    first, second = feed.subscribe(), feed.subscribe()
    await feed.publish([ok(latency_ms=1), ok(latency_ms=2)])
    await feed.publish([failed()])
    for subscription in (first, second):
        batch = await next_of(subscription)
        assert [o.total_latency_ms for o in batch] == [1, 2]
        batch = await next_of(subscription)
        assert [o.error_reason for o in batch] == ["PROVIDER_UNAVAILABLE"]


async def test_memory_feed_subscription_misses_earlier_batches() -> None:
    feed = MemoryFeed()
    await feed.publish([ok(latency_ms=1)])
    subscription = feed.subscribe()
    await feed.publish([ok(latency_ms=2)])
    batch = await next_of(subscription)
    assert [o.total_latency_ms for o in batch] == [2]


async def test_memory_feed_history_is_the_recent_outcomes_oldest_first() -> None:
    fake = FakeClock(0.0)
    feed = MemoryFeed(clock=lambda: fake.now)
    await feed.publish([ok(latency_ms=1)])
    fake.advance(10)
    await feed.publish([ok(latency_ms=2), ok(latency_ms=3)])
    fake.advance(10)
    await feed.publish([ok(latency_ms=4)])
    fake.advance(5)  # now 25: published at 0, 10 and 20
    assert [o.total_latency_ms for o in await feed.history(15)] == [2, 3, 4]
    assert [o.total_latency_ms for o in await feed.history(25)] == [1, 2, 3, 4]
    assert [o.total_latency_ms for o in await feed.history(5)] == [4]
    assert await feed.history(4.9) == []


async def test_memory_feed_keeps_a_bounded_history() -> None:
    feed = MemoryFeed(clock=lambda: 0.0)
    for index in range(_MEMORY_HISTORY + 5):
        await feed.publish([ok(latency_ms=index)])
    history = await feed.history(1.0)
    assert len(history) == _MEMORY_HISTORY
    assert history[0].total_latency_ms == 5
    assert history[-1].total_latency_ms == _MEMORY_HISTORY + 4


async def test_memory_feed_close_ends_every_subscription() -> None:
    feed = MemoryFeed()
    subscriptions = [feed.subscribe(), feed.subscribe()]
    await feed.publish([ok()])

    async def collect(subscription: AsyncIterator[list[health_pb2.AttemptOutcome]]) -> int:
        return sum([len(batch) async for batch in subscription])

    readers = [asyncio.create_task(collect(s)) for s in subscriptions]
    await asyncio.sleep(0)
    await feed.close()
    assert await asyncio.wait_for(asyncio.gather(*readers), timeout=2) == [1, 1]
    # Finished subscriptions are forgotten: a later batch reaches only new subscribers.
    late = feed.subscribe()
    await feed.publish([ok(latency_ms=9)])
    assert [o.total_latency_ms for o in await next_of(late)] == [9]
    for subscription in subscriptions:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(anext(subscription), timeout=0.01)


def test_build_feed_without_a_redis_url_is_in_memory() -> None:
    assert isinstance(build_feed(None), MemoryFeed)
    assert isinstance(build_feed(""), MemoryFeed)


# --- validate_report ----------------------------------------------------------------------------


def invalid_field(request: health_pb2.ReportRequest) -> str:
    with pytest.raises(SwitchyardError) as raised:
        validate_report(request)
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == Reason.INVALID_REQUEST
    return error.metadata["field"]


def test_a_valid_batch_passes() -> None:
    request = health_pb2.ReportRequest(
        outcomes=[
            ok(),
            failed("TIMEOUT"),
            failed("ERROR_REASON_TIMEOUT"),
            failed("RATE_LIMITED"),
            health_pb2.AttemptOutcome(
                provider="openai", probe=True, success=True, output_tokens_per_second=0.0
            ),
            health_pb2.AttemptOutcome(
                provider="x" * MAX_NAME_CHARS, model="m" * MAX_NAME_CHARS, success=True
            ),
        ]
    )
    validate_report(request)
    validate_report(health_pb2.ReportRequest())


@pytest.mark.parametrize("reason", ["TIMEOUT", "ERROR_REASON_TIMEOUT", "INTERNAL", "ERROR_REASON_NO_ROUTE"])
def test_failure_reasons_with_or_without_prefix_are_accepted(reason: str) -> None:
    validate_report(health_pb2.ReportRequest(outcomes=[failed(reason)]))


def test_more_than_max_outcomes_is_refused() -> None:
    validate_report(health_pb2.ReportRequest(outcomes=[ok()] * MAX_REPORT_OUTCOMES))
    assert invalid_field(health_pb2.ReportRequest(outcomes=[ok()] * (MAX_REPORT_OUTCOMES + 1))) == "outcomes"


@pytest.mark.parametrize("provider", ["", "   "])
def test_an_outcome_names_its_provider(provider: str) -> None:
    request = health_pb2.ReportRequest(outcomes=[ok(), ok(provider=provider)])
    assert invalid_field(request) == "outcomes[1].provider"


@pytest.mark.parametrize(
    ("provider", "model"), [("x" * (MAX_NAME_CHARS + 1), "m"), ("p", "m" * (MAX_NAME_CHARS + 1))]
)
def test_names_are_bounded(provider: str, model: str) -> None:
    assert invalid_field(health_pb2.ReportRequest(outcomes=[ok(provider, model)])) == "outcomes[0]"


def test_the_reporting_region_is_bounded_like_the_names() -> None:
    placed = ok()
    placed.region = "r" * MAX_NAME_CHARS
    validate_report(health_pb2.ReportRequest(outcomes=[placed]))
    placed.region += "r"
    assert invalid_field(health_pb2.ReportRequest(outcomes=[ok(), placed])) == "outcomes[1]"


def test_a_success_with_an_error_reason_is_refused() -> None:
    outcome = ok()
    outcome.error_reason = "TIMEOUT"
    assert (
        invalid_field(health_pb2.ReportRequest(outcomes=[ok(), ok(), outcome])) == "outcomes[2].error_reason"
    )


@pytest.mark.parametrize("reason", ["", "BOGUS", "ERROR_REASON_UNSPECIFIED", "UNSPECIFIED", "timeout"])
def test_a_failure_without_a_known_reason_is_refused(reason: str) -> None:
    assert invalid_field(health_pb2.ReportRequest(outcomes=[failed(reason)])) == "outcomes[0].error_reason"


@pytest.mark.parametrize("rate", [math.nan, math.inf, -math.inf, -0.5])
def test_tokens_per_second_must_be_finite_and_not_negative(rate: float) -> None:
    outcome = ok()
    outcome.output_tokens_per_second = rate
    field = invalid_field(health_pb2.ReportRequest(outcomes=[ok(), outcome]))
    assert field == "outcomes[1].output_tokens_per_second"


def test_the_first_bad_outcome_is_named() -> None:
    bad_rate = ok()
    bad_rate.output_tokens_per_second = -1.0
    request = health_pb2.ReportRequest(outcomes=[ok(), failed("BOGUS"), bad_rate])
    assert invalid_field(request) == "outcomes[1].error_reason"


# --- HealthMonitor: broadcasting ----------------------------------------------------------------


async def test_apply_broadcasts_the_version_and_changed_entries_to_every_watcher() -> None:
    fake = FakeClock()
    monitor, _ = make_monitor(fake)
    first, second = monitor.watch(), monitor.watch()
    monitor.apply([ok(), ok(model="o4-mini")])
    for queue in (first, second):
        assert queue.qsize() == 1
        event = queue.get_nowait()
        assert event is not None
        version, entries = event
        assert version == monitor.book.version
        assert sorted((e.provider, e.model) for e in entries) == [
            ("openai", ""),
            ("openai", "gpt-4o"),
            ("openai", "o4-mini"),
        ]
        assert all(e.status == health_pb2.HEALTH_STATUS_HEALTHY for e in entries)
    monitor.apply([failed()])
    event = first.get_nowait()
    assert event is not None
    # The provider's aggregate counts the failure but judges only probes: still healthy.
    assert [(e.model, e.status) for e in event[1]] == [
        ("gpt-4o", health_pb2.HEALTH_STATUS_DEGRADED),
        ("", health_pb2.HEALTH_STATUS_HEALTHY),
    ]
    assert event[0] == monitor.book.version


async def test_no_change_means_no_broadcast() -> None:
    fake = FakeClock()
    monitor, _ = make_monitor(fake)
    monitor.apply([ok()])
    queue = monitor.watch()
    monitor.apply([failed("INVALID_REQUEST")])
    monitor.apply([])
    monitor.tick()
    assert queue.empty()


async def test_tick_broadcasts_when_an_open_breaker_turns_half_open() -> None:
    fake = FakeClock()
    monitor, _ = make_monitor(fake, failure_threshold=2, open_s=30.0)
    monitor.apply([failed(), failed()])
    queue = monitor.watch()
    fake.advance(29)
    monitor.tick()
    assert queue.empty()
    fake.advance(1)
    monitor.tick()
    event = queue.get_nowait()
    assert event is not None
    version, entries = event
    assert version == monitor.book.version
    assert [(e.model, e.breaker) for e in entries] == [("gpt-4o", health_pb2.BREAKER_STATE_HALF_OPEN)]
    assert queue.empty()


async def test_a_watcher_that_falls_behind_gets_a_single_none_to_start_over() -> None:
    fake = FakeClock()
    monitor, _ = make_monitor(fake)
    slow, fast = monitor.watch(), monitor.watch()
    for index in range(WATCH_QUEUE):
        monitor.apply([ok(latency_ms=index + 1)])
        fast_events = drain(fast)
        assert len(fast_events) == 1 and fast_events[0] is not None
    assert slow.qsize() == WATCH_QUEUE  # full, but nothing dropped yet
    assert all(event is not None for event in list(slow._queue))  # type: ignore[attr-defined]
    monitor.apply([ok(latency_ms=999)])
    assert drain(slow) == [None]
    fast_events = drain(fast)
    assert len(fast_events) == 1 and fast_events[0] is not None
    # After starting over, the watcher gets changes again, behind its None.
    monitor.apply([ok(latency_ms=5)])
    monitor.apply([ok(latency_ms=6)])
    events = drain(slow)
    assert len(events) == 2
    assert all(event is not None for event in events)


async def test_overflow_after_a_none_leaves_one_none() -> None:
    fake = FakeClock()
    monitor, _ = make_monitor(fake)
    queue = monitor.watch()
    for index in range(2 * WATCH_QUEUE + 1):
        monitor.apply([ok(latency_ms=index + 1)])
    # 64 events, a None (65th), 63 more events, then the 129th overflows again.
    assert drain(queue) == [None]


async def test_unwatch_stops_delivery() -> None:
    fake = FakeClock()
    monitor, _ = make_monitor(fake)
    queue = monitor.watch()
    monitor.unwatch(queue)
    monitor.unwatch(queue)  # twice is harmless
    monitor.apply([ok()])
    assert queue.empty()


# --- HealthMonitor: start, follow, close --------------------------------------------------------


async def test_start_warms_up_from_history_then_follows_the_feed() -> None:
    fake = FakeClock()
    feed = MemoryFeed(clock=lambda: fake.now)
    await feed.publish([ok(model="old")])  # older than the window: not replayed
    fake.advance(61)
    await feed.publish([failed(), failed()])
    monitor, _ = make_monitor(fake, feed)
    await monitor.start()
    try:
        assert monitor.book.entry("openai", "old") is None
        warmed = monitor.book.entry("openai", "gpt-4o")
        assert warmed is not None
        assert warmed.consecutive_failures == 2
        queue = monitor.watch()
        await feed.publish([ok(model="new")])
        event = await asyncio.wait_for(queue.get(), timeout=2)
        assert event is not None
        assert [(e.provider, e.model) for e in event[1]] == [("openai", "new"), ("openai", "")]
    finally:
        await monitor.close()
    # Closed: the feed no longer delivers to the monitor.
    await feed.publish([ok(model="after-close")])
    await asyncio.sleep(0)
    assert monitor.book.entry("openai", "after-close") is None


async def test_a_batch_that_fails_to_apply_does_not_stop_following(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClock()
    monitor, feed = make_monitor(fake)
    real_apply_many = monitor.book.apply_many
    calls = 0

    def flaky(outcomes: Any) -> list[health_pb2.ModelHealth]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bad batch")
        return real_apply_many(outcomes)

    monkeypatch.setattr(monitor.book, "apply_many", flaky)
    await monitor.start()
    try:
        await asyncio.sleep(0)
        queue = monitor.watch()
        await feed.publish([ok(model="first")])
        await feed.publish([ok(model="second")])
        event = await asyncio.wait_for(queue.get(), timeout=2)
        assert event is not None
        assert [e.model for e in event[1]] == ["second", ""]
        assert monitor.book.entry("openai", "first") is None
    finally:
        await monitor.close()


async def test_a_batch_published_right_after_start_is_applied() -> None:
    fake = FakeClock()
    monitor, feed = make_monitor(fake)
    await monitor.start()
    try:
        await feed.publish([ok(model="early")])  # no yield between start() and this publish
        for _ in range(10):
            await asyncio.sleep(0)
        assert monitor.book.entry("openai", "early") is not None
    finally:
        await monitor.close()


# --- the servicer -------------------------------------------------------------------------------


async def test_report_validates_then_publishes() -> None:
    fake = FakeClock()
    monitor, feed = make_monitor(fake)
    servicer = HealthMonitorServicer(monitor)
    subscription = feed.subscribe()
    reply = await servicer.Report(health_pb2.ReportRequest(outcomes=[ok(), failed()]), None)
    assert reply.accepted == 2
    batch = await next_of(subscription)
    assert [o.success for o in batch] == [True, False]
    with pytest.raises(SwitchyardError):
        await servicer.Report(health_pb2.ReportRequest(outcomes=[ok(), failed("BOGUS")]), None)
    assert (await servicer.Report(health_pb2.ReportRequest(), None)).accepted == 0
    assert await feed.history(1000) == batch  # neither the bad nor the empty batch was published


async def test_snapshot_returns_the_book_filtered_by_provider() -> None:
    fake = FakeClock()
    monitor, _ = make_monitor(fake)
    monitor.apply([ok(provider="openai"), ok(provider="anthropic", model="claude")])
    servicer = HealthMonitorServicer(monitor)
    everything = await servicer.Snapshot(health_pb2.SnapshotRequest(), None)
    assert [(e.provider, e.model) for e in everything.snapshot.entries] == [
        ("anthropic", ""),
        ("anthropic", "claude"),
        ("openai", ""),
        ("openai", "gpt-4o"),
    ]
    assert everything.snapshot.version == monitor.book.version
    only = await servicer.Snapshot(health_pb2.SnapshotRequest(provider="anthropic"), None)
    assert [(e.provider, e.model) for e in only.snapshot.entries] == [
        ("anthropic", ""),
        ("anthropic", "claude"),
    ]


async def test_watch_streams_a_snapshot_then_updates_and_starts_over_after_falling_behind() -> None:
    fake = FakeClock()
    monitor, _ = make_monitor(fake)
    monitor.apply([ok(model="a")])
    servicer = HealthMonitorServicer(monitor)
    stream = servicer.Watch(health_pb2.WatchRequest(subscriber_id="router-1"), None)
    assert isinstance(stream, AsyncGenerator)
    try:
        first = await next_of(stream)
        assert first.WhichOneof("event") == "snapshot"
        assert [e.model for e in first.snapshot.entries] == ["", "a"]
        monitor.apply([ok(model="b")])
        second = await next_of(stream)
        assert second.WhichOneof("event") == "update"
        assert second.update.version == monitor.book.version
        assert [e.model for e in second.update.entries] == ["b", ""]
        for index in range(WATCH_QUEUE + 1):
            monitor.apply([ok(model="c", latency_ms=index + 1)])
        third = await next_of(stream)
        assert third.WhichOneof("event") == "snapshot"
        assert [e.model for e in third.snapshot.entries] == ["", "a", "b", "c"]
        assert third.snapshot.version == monitor.book.version
    finally:
        await stream.aclose()
    # Closing the stream unwatches: later changes reach no queue.
    monitor.apply([ok(model="d")])
    assert not monitor._watchers
