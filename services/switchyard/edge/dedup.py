"""In-flight deduplication: identical requests of one tenant share one upstream call.

A request's key is a hash of its tenant and the request with everything that does not
change the answer cleared (its request id and cache policy), serialised deterministically.
The first request with a key starts a *flight*: a task, owned by no caller, that runs the
pipeline and records every chunk. Every request with the same key that arrives while the
flight is running joins it: it receives the chunks recorded so far, then each new one as
it comes. So a streaming request fans the same chunks out to every waiter.

* A waiter that goes away leaves; the others carry on. The flight is cancelled (closing the
  upstream) only when its last waiter has gone.
* The upstream cost is recorded once: the first request's `done` carries it; a joiner's
  `done` carries its own request id, `cost_micros` 0, `saved_micros` the shared cost and
  cache status `DEDUPLICATED`.
* An error ends every waiter's stream with that same error.

`InflightDedup` is that table for one edge process. `RedisDedup` (edge/dedup_redis.py) keeps
one in front of Redis so that identical requests landing on different edge replicas share one
upstream call too; both implement `Dedup`, and `build_dedup` picks one from the settings.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from switchyard.common.logging import get_logger
from switchyard.common.settings import Settings
from switchyard.v1 import common_pb2

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = get_logger(__name__)

ChunkSource = Callable[[], AsyncIterator[common_pb2.ChatChunk]]
"""Starts the pipeline for a request; called once per flight, by whichever request leads it."""


class Dedup(Protocol):
    """A dedup table, in one process (`InflightDedup`) or shared by edge replicas (`RedisDedup`)."""

    def stream(
        self, key: str, request_id: str, source: ChunkSource
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        """The chunks of `source()` for the request `request_id`, shared with every identical
        request in flight under `key`: only the request that leads the flight calls `source`,
        the others get the same chunks with a joiner's `done` (see `as_joiner`)."""
        ...

    async def aclose(self) -> None:
        """Stop the flights still running and release what the table owns (at shutdown)."""
        ...


def request_key(tenant_id: str, request: common_pb2.ChatRequest) -> str:
    """The dedup key of `request` for `tenant_id`: equal for requests that ask the same thing."""
    # The fields that do not change the answer are set aside for the serialisation rather than
    # cleared on a copy: this runs on every request, and a copy would duplicate the prompt.
    request_id = request.request_id
    cache = request.cache if request.HasField("cache") else None
    request.ClearField("request_id")
    request.ClearField("cache")
    try:
        serialised = request.SerializeToString(deterministic=True)
    finally:
        request.request_id = request_id
        if cache is not None:
            request.cache.CopyFrom(cache)
    digest = hashlib.blake2b(digest_size=20)
    digest.update(tenant_id.encode())
    digest.update(b"\x00")
    digest.update(serialised)
    return digest.hexdigest()


@dataclass(slots=True)
class _Flight:
    key: str
    chunks: list[common_pb2.ChatChunk] = field(default_factory=list)
    error: BaseException | None = None
    finished: bool = False
    waiters: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class InflightDedup:
    """The table of requests in flight on this edge, by dedup key."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}
        self.shared = 0
        """How many requests joined a flight instead of calling upstream (for stats/tests)."""

    def __len__(self) -> int:
        return len(self._flights)

    async def stream(
        self, key: str, request_id: str, source: ChunkSource
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        """The chunks of `source()` for the request `request_id`, shared with every identical
        request in flight under `key`."""
        flight = self._flights.get(key)
        leader = flight is None
        if flight is None:
            flight = _Flight(key)
            self._flights[key] = flight
            flight.task = asyncio.create_task(self._run(flight, source), name=f"dedup-{key[:12]}")
        else:
            self.shared += 1
        flight.waiters += 1
        position = 0
        try:
            while True:
                while position < len(flight.chunks):
                    chunk = flight.chunks[position]
                    position += 1
                    yield chunk if leader else as_joiner(chunk, request_id)
                if flight.finished:
                    if flight.error is not None:
                        raise flight.error
                    return
                flight.changed.clear()
                await flight.changed.wait()
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.finished and flight.task is not None:
                flight.task.cancel()
                self._forget(flight)

    async def _run(self, flight: _Flight, source: ChunkSource) -> None:
        chunks = source()
        try:
            async for chunk in chunks:
                flight.chunks.append(chunk)
                flight.changed.set()
        except asyncio.CancelledError:
            flight.error = asyncio.CancelledError()
            raise
        except Exception as exc:  # every waiter gets the same error
            flight.error = exc
        finally:
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                await closer()
            flight.finished = True
            self._forget(flight)
            flight.changed.set()

    def _forget(self, flight: _Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    async def aclose(self) -> None:
        """Cancel the flights still running (closing their upstreams); their waiters end too.

        Meant for shutdown, after the server has drained its calls: by then a flight left
        running has nobody who could still wait for it.
        """
        tasks = [flight.task for flight in self._flights.values() if flight.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def as_joiner(chunk: common_pb2.ChatChunk, request_id: str) -> common_pb2.ChatChunk:
    """A joiner's copy of a chunk: its own request id on `done`, the cost recorded once.

    A `done` that is already a joiner's (cache status `DEDUPLICATED`: a flight followed on
    another replica, then shared again in this process) only gets the request id: its saving
    is already the shared cost, and its cost already 0.
    """
    if chunk.WhichOneof("event") != "done":
        return chunk
    copy = common_pb2.ChatChunk()
    copy.CopyFrom(chunk)
    done = copy.done
    done.request_id = request_id
    if chunk.done.cache_status != common_pb2.CACHE_STATUS_DEDUPLICATED:
        done.saved_micros = chunk.done.cost_micros
        done.cost_micros = 0
        done.cache_status = common_pb2.CACHE_STATUS_DEDUPLICATED
    return copy


def build_dedup(settings: Settings, *, redis: Redis | None = None) -> Dedup | None:
    """The edge's dedup table: None when `edge_dedup` is off, shared through Redis when
    `settings.redis_url` is set (or a client is given), else the per-process table.

    A client passed in stays the caller's; one opened here is the table's, closed by `aclose()`.
    It is a client of its own rather than the rate limiter's: a follower holds a pooled
    connection while it blocks on a chunk stream, and must not starve the rate-limit calls.
    """
    # Imported here: dedup_redis builds on this module (InflightDedup, as_joiner).
    from switchyard.edge.dedup_redis import RedisDedup, open_dedup_redis

    if not settings.edge_dedup:
        return None
    if redis is not None:
        return RedisDedup(redis)
    if settings.redis_url:
        return RedisDedup(open_dedup_redis(settings.redis_url), owns_client=True)
    return InflightDedup()
