"""Sharing attempt outcomes between health-monitor replicas.

Every replica publishes the batches it receives to one feed and applies every batch it reads
back from the feed, its own included, so all replicas apply the same outcomes in the same
order and converge on the same picture. A replica that starts reads the recent history first
(the breaker window) and then follows the feed from where the history ended.

* `MemoryFeed`: in-process, for one replica (the embedded default);
* `RedisFeed`: a Redis stream, `OUTCOME_STREAM`, one entry per batch (field `b`, a serialized
  `ReportRequest`), trimmed to about `STREAM_MAXLEN` entries. Readers block on XREAD; after a
  Redis error they log once per outage and retry with backoff, from the last entry they read.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final, Protocol

import grpc
from google.protobuf.message import DecodeError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import get_logger
from switchyard.common.redis_client import RedisOptions, open_redis
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

log = get_logger(__name__)

OUTCOME_STREAM: Final = "switchyard:health:outcomes"
STREAM_MAXLEN: Final = 100_000
# A blocked XREAD waits this long for new entries (under the client's socket timeout).
READ_BLOCK_MS: Final = 1_000
READ_COUNT: Final = 100
HISTORY_PAGE: Final = 1_000
FEED_REDIS_OPTIONS: Final = RedisOptions(max_connections=16, socket_timeout_s=READ_BLOCK_MS / 1000 + 2.0)
_FIELD: Final = b"b"
_BACKOFF_FIRST_S: Final = 0.1
_BACKOFF_CAP_S: Final = 5.0
_REDIS_ERRORS: Final = (RedisError, OSError)
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
    """A feed on a Redis stream shared by every replica (see the module doc)."""

    def __init__(self, client: Redis, *, stream: str = OUTCOME_STREAM, maxlen: int = STREAM_MAXLEN) -> None:
        self._client = client
        self._stream = stream
        self._maxlen = maxlen
        # Where subscriptions start: the last entry `history` saw, else "$" (only new entries).
        self._start_id: bytes | str = "$"
        self._closed = False
        self._outage = False

    async def publish(self, outcomes: Sequence[health_pb2.AttemptOutcome]) -> None:
        """XADD the batch as one entry."""
        payload = health_pb2.ReportRequest(outcomes=outcomes).SerializeToString()
        try:
            await self._client.xadd(self._stream, {_FIELD: payload}, maxlen=self._maxlen, approximate=True)
        except _REDIS_ERRORS as exc:
            log.warning("health_feed_publish_failed", error=type(exc).__name__)
            raise SwitchyardError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.DEPENDENCY_UNAVAILABLE,
                "the health feed is unavailable",
                retry_after_s=1.0,
            ) from exc

    async def history(self, since_s: float) -> Batch:
        """The entries of the last `since_s` seconds (by Redis's clock), oldest first; later
        subscriptions start right after the newest entry read here."""
        newest = await self._newest_id()
        self._start_id = newest
        if newest == "0-0":
            return []
        seconds, micros = await self._client.time()
        floor = f"{max(0, int(seconds * 1000 + micros // 1000 - since_s * 1000))}-0"
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        upper: bytes | str = self._start_id
        while True:
            page = _stream_entries(
                await self._client.xrevrange(self._stream, upper, floor, count=HISTORY_PAGE)
            )
            entries.extend(page)
            if len(page) < HISTORY_PAGE:
                break
            upper = b"(" + page[-1][0]
        outcomes: Batch = []
        for entry_id, fields in reversed(entries):
            outcomes.extend(self._decode(entry_id, fields))
        return outcomes

    def subscribe(self) -> AsyncIterator[Batch]:
        """Every entry after the end of `history` (or, without it, after the first read)."""
        return self._follow(self._start_id)

    async def _follow(self, last_id: bytes | str) -> AsyncIterator[Batch]:
        delay = _BACKOFF_FIRST_S
        while not self._closed:
            try:
                if last_id == "$":
                    # Pin "$" to a real id once, so entries added between two reads are not skipped.
                    last_id = await self._newest_id()
                reply = await self._client.xread(
                    {self._stream: last_id}, count=READ_COUNT, block=READ_BLOCK_MS
                )
            except _REDIS_ERRORS as exc:
                if self._closed:
                    return
                if not self._outage:
                    self._outage = True
                    log.warning("health_feed_read_failed", error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_CAP_S)
                continue
            if self._outage:
                self._outage = False
                log.info("health_feed_read_resumed")
            delay = _BACKOFF_FIRST_S
            for entry_id, fields in _read_entries(reply):
                last_id = entry_id
                batch = self._decode(entry_id, fields)
                if batch:
                    yield batch

    async def _newest_id(self) -> bytes | str:
        """The id of the stream's newest entry, or "0-0" when it is empty."""
        newest = _stream_entries(await self._client.xrevrange(self._stream, "+", "-", count=1))
        return newest[0][0] if newest else "0-0"

    @staticmethod
    def _decode(entry_id: bytes, fields: dict[bytes, bytes]) -> Batch:
        try:
            return list(health_pb2.ReportRequest.FromString(fields[_FIELD]).outcomes)
        except (KeyError, DecodeError):
            log.warning("health_feed_entry_skipped", entry_id=entry_id.decode(errors="replace"))
            return []

    async def close(self) -> None:
        """Stop the readers (at their next read) and close the client."""
        self._closed = True
        await self._client.aclose()


def _stream_entries(reply: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The (id, fields) pairs of an XRANGE / XREVRANGE reply."""
    if not isinstance(reply, list):
        return []
    return [(entry_id, fields) for entry_id, fields in reply]


def _read_entries(reply: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREAD reply (RESP2: a list of [stream, entries]; RESP3: a map)."""
    if isinstance(reply, dict):
        streams = list(reply.values())
    elif isinstance(reply, list):
        streams = [item[1] for item in reply]
    else:
        return []
    return [entry for entries in streams for entry in _stream_entries(entries)]


def build_feed(redis_url: str | None) -> OutcomeFeed:
    """A `RedisFeed` on `redis_url`, or a `MemoryFeed` without one."""
    if not redis_url:
        return MemoryFeed()
    return RedisFeed(open_redis(redis_url, options=FEED_REDIS_OPTIONS, client_name="switchyard-health-feed"))
