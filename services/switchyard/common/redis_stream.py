"""A feed of items on a Redis stream that every replica publishes to and follows.

One stream entry per item (field `b`, the item's bytes), trimmed to about `maxlen` entries.
A replica that starts reads the recent history first (`history`), then follows the stream
from where the history ended (`subscribe`), so it misses nothing in between. Readers block on
XREAD; after a Redis error they log once per outage and retry with backoff from the last
entry they read (`outage`, when given, hears when reads fail and when they resume).
Publishing while Redis is down raises UNAVAILABLE.

The health monitor shares attempt outcomes this way (health/feed.py) and the cache shares the
vectors of the questions it stores (cache/vectors.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Final, Generic, TypeVar

import grpc
from redis.asyncio import Redis
from redis.exceptions import RedisError

from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import get_logger

__all__ = ["READ_BLOCK_MS", "RedisStreamFeed"]

log = get_logger(__name__)

# A blocked XREAD waits this long for new entries (keep the client's socket timeout above it).
READ_BLOCK_MS: Final = 1_000
READ_COUNT: Final = 100
HISTORY_PAGE: Final = 1_000
_FIELD: Final = b"b"
_BACKOFF_FIRST_S: Final = 0.1
_BACKOFF_CAP_S: Final = 5.0
_REDIS_ERRORS: Final = (RedisError, OSError)

T = TypeVar("T")


class RedisStreamFeed(Generic[T]):
    """Items of type T on one Redis stream (see the module doc)."""

    def __init__(
        self,
        client: Redis,
        *,
        stream: str,
        maxlen: int,
        encode: Callable[[T], bytes],
        decode: Callable[[bytes], T],
        name: str,
        outage: Callable[[bool], None] | None = None,
    ) -> None:
        self._client = client
        self._stream = stream
        self._maxlen = maxlen
        self._encode = encode
        self._decode = decode
        self._name = name
        # Where subscriptions start: the last entry `history` saw, else "$" (only new entries).
        self._start_id: bytes | str = "$"
        self._closed = False
        self._outage = False
        self._on_outage = outage

    async def publish(self, item: T) -> None:
        """XADD the item as one entry."""
        try:
            await self._client.xadd(
                self._stream, {_FIELD: self._encode(item)}, maxlen=self._maxlen, approximate=True
            )
        except _REDIS_ERRORS as exc:
            log.warning("stream_publish_failed", feed=self._name, error=type(exc).__name__)
            raise SwitchyardError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.DEPENDENCY_UNAVAILABLE,
                f"the {self._name} feed is unavailable",
                retry_after_s=1.0,
            ) from exc

    async def history(self, since_s: float | None = None) -> list[T]:
        """The items of the last `since_s` seconds (by Redis's clock; None: all the stream
        keeps), oldest first; later subscriptions start right after the newest one read here."""
        newest = await self._newest_id()
        self._start_id = newest
        if newest == "0-0":
            return []
        floor = "-"
        if since_s is not None:
            seconds, micros = await self._client.time()
            floor = f"{max(0, int(seconds * 1000 + micros // 1000 - since_s * 1000))}-0"
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        upper: bytes | str = newest
        while True:
            page = _stream_entries(
                await self._client.xrevrange(self._stream, upper, floor, count=HISTORY_PAGE)
            )
            entries.extend(page)
            if len(page) < HISTORY_PAGE:
                break
            upper = b"(" + page[-1][0]
        items: list[T] = []
        for entry_id, fields in reversed(entries):
            item = self._item(entry_id, fields)
            if item is not None:
                items.append(item)
        return items

    async def start_here(self) -> None:
        """Later subscriptions start after the stream's newest entry, as after `history`."""
        self._start_id = await self._newest_id()

    def subscribe(self) -> AsyncIterator[T]:
        """Every item after the end of `history` (or, without it, after the first read)."""
        return self._follow(self._start_id)

    async def _follow(self, last_id: bytes | str) -> AsyncIterator[T]:
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
                    log.warning("stream_read_failed", feed=self._name, error=type(exc).__name__)
                    if self._on_outage is not None:
                        self._on_outage(True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_CAP_S)
                continue
            if self._outage:
                self._outage = False
                log.info("stream_read_resumed", feed=self._name)
                if self._on_outage is not None:
                    self._on_outage(False)
            delay = _BACKOFF_FIRST_S
            for entry_id, fields in _read_entries(reply):
                last_id = entry_id
                item = self._item(entry_id, fields)
                if item is not None:
                    yield item

    async def _newest_id(self) -> bytes | str:
        """The id of the stream's newest entry, or "0-0" when it is empty."""
        newest = _stream_entries(await self._client.xrevrange(self._stream, "+", "-", count=1))
        return newest[0][0] if newest else "0-0"

    def _item(self, entry_id: bytes, fields: dict[bytes, bytes]) -> T | None:
        try:
            return self._decode(fields[_FIELD])
        except Exception:  # a foreign or corrupt entry: skipped, the feed goes on
            log.warning("stream_entry_skipped", feed=self._name, entry_id=entry_id.decode(errors="replace"))
            return None

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
