"""The health monitor: attempt outcomes in, a per (provider, model) picture out.

* `Report` takes a batch of outcomes from an edge (at most `MAX_REPORT_OUTCOMES`), checks
  every one before any of them counts, and publishes the batch to the outcome feed;
* every replica applies every batch it reads from the feed (its own included) to its
  `HealthBook`, and advances the book every `TICK_S` (breakers turning half-open, windows
  expiring, headroom resets passing);
* `Snapshot` returns the book; `Watch` streams a snapshot first and then the entries each
  change touched, starting over with a new snapshot when a subscriber falls behind;
* the `Prober` asks each catalog provider's adapter `Probe` on a jittered schedule and
  publishes the outcomes like an edge would.

With `redis_url` set the feed is a Redis stream shared by the replicas (see `feed.py`),
which warm up from its recent history when they start; otherwise it is in memory.

At shutdown every `Watch` stream ends at once, cleanly, and new ones are refused
(`common.drain`), so the routers resubscribe to another replica instead of waiting out the grace.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
from collections.abc import AsyncIterator
from typing import Final

import grpc

from switchyard.common.channels import ChannelPool
from switchyard.common.drain import DRAINED, StreamDrain
from switchyard.common.errors import invalid
from switchyard.common.logging import get_logger
from switchyard.common.server import ServiceBinding, ServiceParts
from switchyard.common.settings import Settings
from switchyard.common.tasks import cancel_all
from switchyard.health.book import HealthBook, HealthConfig
from switchyard.health.feed import Batch, OutcomeFeed, build_feed
from switchyard.health.prober import Prober, adapter_probe
from switchyard.v1 import common_pb2, health_pb2, health_pb2_grpc

__all__ = ["MAX_REPORT_OUTCOMES", "HealthMonitor", "HealthMonitorServicer", "build", "validate_report"]

log = get_logger(__name__)

SERVICE_NAME: Final = health_pb2.DESCRIPTOR.services_by_name["HealthMonitorService"].full_name
MAX_REPORT_OUTCOMES: Final = 1_000
MAX_NAME_CHARS: Final = 256
TICK_S: Final = 0.25
# A watcher with this many undelivered updates starts over from a fresh snapshot.
WATCH_QUEUE: Final = 64
_REASONS: Final = frozenset(
    name.removeprefix("ERROR_REASON_")
    for name in common_pb2.ErrorReason.keys()
    if name != "ERROR_REASON_UNSPECIFIED"
)

# What a watcher receives: changed entries with the version they brought, or None to start over.
_Event = tuple[int, list[health_pb2.ModelHealth]] | None


def validate_report(request: health_pb2.ReportRequest) -> None:
    """Raise INVALID_ARGUMENT (with the field path) for the first outcome that cannot count."""
    if len(request.outcomes) > MAX_REPORT_OUTCOMES:
        raise invalid(f"at most {MAX_REPORT_OUTCOMES} outcomes per report", "outcomes")
    for index, outcome in enumerate(request.outcomes):
        path = f"outcomes[{index}]"
        if not outcome.provider.strip():
            raise invalid("an outcome names its provider", f"{path}.provider")
        if max(len(outcome.provider), len(outcome.model), len(outcome.region)) > MAX_NAME_CHARS:
            raise invalid(f"provider, model and region names are at most {MAX_NAME_CHARS} characters", path)
        reason = outcome.error_reason.removeprefix("ERROR_REASON_")
        if outcome.success and reason:
            raise invalid("a successful outcome has no error reason", f"{path}.error_reason")
        if not outcome.success and reason not in _REASONS:
            raise invalid("a failed outcome names an ErrorReason", f"{path}.error_reason")
        rate = outcome.output_tokens_per_second
        if not math.isfinite(rate) or rate < 0:
            raise invalid(
                "output tokens per second is a finite number, at least 0", f"{path}.output_tokens_per_second"
            )


class HealthMonitor:
    """One replica's book, kept in step with the feed, and the watchers it feeds."""

    def __init__(self, book: HealthBook, feed: OutcomeFeed) -> None:
        self.book = book
        self.feed = feed
        self._watchers: set[asyncio.Queue[_Event]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Warm up from the feed's recent history, then follow the feed and the clock."""
        history = await self.feed.history(self.book.config.window_s)
        # Subscribed before anything else can run, so no batch falls between history and feed.
        subscription = self.feed.subscribe()
        if history:
            self.book.apply_many(history)
            log.info("health_warmed_up", outcomes=len(history))
        self._tasks.append(asyncio.create_task(self._follow(subscription), name="health-follow"))
        self._tasks.append(asyncio.create_task(self._tick(), name="health-tick"))

    async def close(self) -> None:
        """Stop following and release the feed."""
        await cancel_all(self._tasks)
        self._tasks.clear()
        await self.feed.close()

    def apply(self, batch: list[health_pb2.AttemptOutcome]) -> None:
        """Learn from a batch read from the feed and tell the watchers what changed."""
        self._broadcast(self.book.apply_many(batch))

    def tick(self) -> None:
        """Advance the book's clock-driven state and tell the watchers what changed."""
        self._broadcast(self.book.tick())

    def watch(self) -> asyncio.Queue[_Event]:
        """A queue of the changes from now on."""
        queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[_Event]) -> None:
        """Stop delivering to `queue`."""
        self._watchers.discard(queue)

    def _broadcast(self, changed: list[health_pb2.ModelHealth]) -> None:
        if not changed:
            return
        version = self.book.version
        for queue in self._watchers:
            if queue.qsize() >= WATCH_QUEUE:
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)
            else:
                queue.put_nowait((version, changed))

    async def _follow(self, subscription: AsyncIterator[Batch]) -> None:
        async for batch in subscription:
            try:
                self.apply(batch)
            except Exception:  # a bad outcome must not stop the replica following the feed
                log.exception("health_batch_failed", outcomes=len(batch))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.tick()


class HealthMonitorServicer(health_pb2_grpc.HealthMonitorServiceServicer):
    """Report, Snapshot and Watch on one replica's `HealthMonitor`."""

    def __init__(self, monitor: HealthMonitor) -> None:
        self._monitor = monitor
        self._streams = StreamDrain("health monitor")

    def drain(self) -> None:
        """Shutdown begins: every Watch stream ends (after what it has queued) and new ones are
        refused UNAVAILABLE, so routers resubscribe elsewhere at once."""
        self._streams.drain()

    async def Report(
        self, request: health_pb2.ReportRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.ReportResponse:
        """Check the whole batch, then publish it for every replica."""
        validate_report(request)
        if request.outcomes:
            await self._monitor.feed.publish(list(request.outcomes))
        return health_pb2.ReportResponse(accepted=len(request.outcomes))

    async def Snapshot(
        self, request: health_pb2.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.SnapshotResponse:
        """The whole picture (one provider's, when asked)."""
        return health_pb2.SnapshotResponse(snapshot=self._monitor.book.snapshot(request.provider))

    async def Watch(
        self, request: health_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.WatchResponse]:
        """A snapshot first, then each change (a new snapshot when this watcher fell behind),
        until the monitor shuts down."""
        self._streams.refuse_if_draining()
        queue = self._monitor.watch()
        log.info("health_watch_subscribed", subscriber=request.subscriber_id)
        try:
            yield health_pb2.WatchResponse(snapshot=self._monitor.book.snapshot())
            while (event := await self._streams.next(queue)) is not DRAINED:
                if event is None:
                    yield health_pb2.WatchResponse(snapshot=self._monitor.book.snapshot())
                    continue
                version, entries = event
                yield health_pb2.WatchResponse(
                    update=health_pb2.HealthUpdate(version=version, entries=entries)
                )
        finally:
            self._monitor.unwatch(queue)


def build(settings: Settings) -> ServiceParts:
    """The health monitor's bindings; `start` warms up, follows the feed and starts probing."""
    monitor = HealthMonitor(HealthBook(HealthConfig.from_settings(settings)), build_feed(settings.redis_url))
    servicer = HealthMonitorServicer(monitor)
    channels = ChannelPool(default_timeout_s=settings.call_timeout_s)
    prober: Prober | None = None
    if settings.health_probe_interval_s > 0:
        prober = Prober(
            {name: provider.vendor for name, provider in settings.catalog.providers.items()},
            adapter_probe(channels, settings),
            monitor.feed.publish,
            settings.health_probe_interval_s,
            random.Random(),
        )

    async def start() -> None:
        await monitor.start()
        if prober is not None:
            prober.start()
        log.info("health_monitor_started", replica=f"{os.uname().nodename}-{os.getpid()}")

    async def close() -> None:
        if prober is not None:
            await prober.stop()
        await monitor.close()
        await channels.close()

    return ServiceParts(
        [
            ServiceBinding(
                SERVICE_NAME,
                lambda server: health_pb2_grpc.add_HealthMonitorServiceServicer_to_server(servicer, server),
            )
        ],
        start=start,
        close=close,
        drain=servicer.drain,
    )
