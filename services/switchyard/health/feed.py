"""Sharing attempt outcomes between health-monitor replicas.

Every replica publishes the batches it receives to one feed and applies every batch it reads
back from the feed, its own included, so all replicas apply the same outcomes in the same
order and converge on the same picture. A replica that starts reads the recent history first
(the breaker window) and then follows the feed from where the history ended.

* `MemoryFeed`: in-process, for one replica (the embedded default);
* `RedisFeed`: a Redis stream, `OUTCOME_STREAM`, one entry per batch (a serialized
  `ReportRequest`), trimmed to about `STREAM_MAXLEN` entries (common/redis_stream.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final, Protocol

from redis.asyncio import Redis

from switchyard.common.redis_client import RedisOptions, open_redis
from switchyard.common.redis_stream import READ_BLOCK_MS, RedisStreamFeed
from switchyard.v1 import health_pb2

__all__ = [
    "FEED_REDIS_OPTIONS",
    "OUTCOME_STREAM",
    "STREAM_MAXLEN",
    "MemoryFeed",
    "OutcomeFeed",
    "RedisFeed",
    "build_feed",
]

OUTCOME_STREAM: Final = "switchyard:health:outcomes"
STREAM_MAXLEN: Final = 100_000
FEED_REDIS_OPTIONS: Final = RedisOptions(max_connections=16, socket_timeout_s=READ_BLOCK_MS / 1000 + 2.0)
# The memory feed keeps this many batches of history.
_MEMORY_HISTORY: Final = 10_000

Batch = list[health_pb2.AttemptOutcome]


class OutcomeFeed(Protocol):
    """Where replicas publish outcome batches and read every replica's batches back."""

    async def publish(self, outcomes: Sequence[health_pb2.AttemptOutcome]) -> None:
        """Add one batch (raises `SwitchyardError` UNAVAILABLE when the feed is down)."""
        ...

    def subscribe(self) -> AsyncIterator[Batch]:
        """Every batch published from now on (or from the end of `history`), from every replica."""
        ...

    async def history(self, since_s: float) -> Batch:
        """Outcomes published in the last `since_s` seconds, oldest first, to warm up from."""
        ...

    async def close(self) -> None:
        """Stop every subscription and release the connection."""
        ...


class _MemorySubscription:
    """One reader of a `MemoryFeed`: registered at once, so it misses nothing published later."""

    def __init__(self, feed: MemoryFeed) -> None:
        self._feed = feed
        self.queue: asyncio.Queue[Batch | None] = asyncio.Queue()

    def __aiter__(self) -> _MemorySubscription:
        return self

    async def __anext__(self) -> Batch:
        batch = await self.queue.get()
        if batch is None:
            self._feed.unsubscribe(self)
            raise StopAsyncIteration
        return batch


class MemoryFeed:
    """An in-process feed: a batch reaches every subscriber of this process at once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._subscribers: list[_MemorySubscription] = []
        self._history: deque[tuple[float, Batch]] = deque(maxlen=_MEMORY_HISTORY)

    async def publish(self, outcomes: Sequence[health_pb2.AttemptOutcome]) -> None:
        """Hand the batch to every subscriber."""
        batch = list(outcomes)
        self._history.append((self._clock(), batch))
        for subscriber in self._subscribers:
            subscriber.queue.put_nowait(batch)

    def subscribe(self) -> AsyncIterator[Batch]:
        """Every batch published after this call."""
        subscription = _MemorySubscription(self)
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: _MemorySubscription) -> None:
        """Forget a finished subscription."""
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    async def history(self, since_s: float) -> Batch:
        """Outcomes published in the last `since_s` seconds."""
        cutoff = self._clock() - since_s
        return [outcome for at, batch in self._history if at >= cutoff for outcome in batch]

    async def close(self) -> None:
        """End every subscription."""
        for subscriber in self._subscribers:
            subscriber.queue.put_nowait(None)


class RedisFeed:
    """A feed on a Redis stream shared by every replica: one entry per batch."""

    def __init__(self, client: Redis, *, stream: str = OUTCOME_STREAM, maxlen: int = STREAM_MAXLEN) -> None:
        self._stream: RedisStreamFeed[Batch] = RedisStreamFeed(
            client, stream=stream, maxlen=maxlen, encode=_encode, decode=_decode, name="health"
        )

    async def publish(self, outcomes: Sequence[health_pb2.AttemptOutcome]) -> None:
        """XADD the batch as one entry (UNAVAILABLE when Redis is down)."""
        await self._stream.publish(list(outcomes))

    async def history(self, since_s: float) -> Batch:
        """The outcomes of the last `since_s` seconds (by Redis's clock), oldest first; later
        subscriptions start right after the newest entry read here."""
        return [outcome for batch in await self._stream.history(since_s) for outcome in batch]

    def subscribe(self) -> AsyncIterator[Batch]:
        """Every batch after the end of `history` (or, without it, after the first read)."""
        return self._stream.subscribe()

    async def close(self) -> None:
        """Stop the readers (at their next read) and close the client."""
        await self._stream.close()


def _encode(batch: Batch) -> bytes:
    return health_pb2.ReportRequest(outcomes=batch).SerializeToString()


def _decode(data: bytes) -> Batch:
    return list(health_pb2.ReportRequest.FromString(data).outcomes)


def build_feed(redis_url: str | None) -> OutcomeFeed:
    """A `RedisFeed` on `redis_url`, or a `MemoryFeed` without one."""
    if not redis_url:
        return MemoryFeed()
    return RedisFeed(open_redis(redis_url, options=FEED_REDIS_OPTIONS, client_name="switchyard-health-feed"))
