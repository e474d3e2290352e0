"""The edge answers a lookup sure to miss itself, from the keys its cache replica pushes.

Real `CacheServicer`s served over real gRPC (in process), the edge's real `EdgeCache`, a
real Redis for the shared store: a miss the presence vouches for never reaches the cache
(the replica counts only the lookups it is sent), yet is counted in its stats from the
edge's report; a stored key is looked up and hits, whichever replica stored it; and a
replica that loses its Redis tells the edge to ask every lookup until it has the keys again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from redis.asyncio import Redis

from switchyard.cache.presence import LOADING, SEMANTIC_ON, KeyPresence, PresenceFeed
from switchyard.cache.service import CacheServicer
from switchyard.cache.store import MemoryStore, RedisStore
from switchyard.common.redis_client import RedisOptions, open_redis
from switchyard.edge.cache import EdgeCache
from switchyard.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from tests.support.cache_server import serve_cache
from tests.support.redis_server import RedisServer

MODEL = "openai/gpt-4o-mini"
FAST = RedisOptions(connect_timeout_s=0.2, socket_timeout_s=2.5, pool_timeout_s=0.5)


class Replica(CacheServicer):
    """A cache replica that counts the lookups its calls carry (not the edge's other word)."""

    asked = 0

    async def LookupFrames(
        self, frames: AsyncIterator[cache_pb2.LookupFramesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cache_pb2.LookupFramesResponse]:
        async def counted() -> AsyncIterator[cache_pb2.LookupFramesRequest]:
            async for frame in frames:
                self.asked += sum(1 for item in frame.items if item.id != 0)
                yield frame

        async for reply in super().LookupFrames(counted(), context):
            yield reply


def ask(text: str) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=MODEL)
    request.messages.add(role=common_pb2.ROLE_USER).parts.add(text=text)
    request.sampling.temperature = 0.0
    return request


def unique() -> common_pb2.ChatRequest:
    return ask(f"What is the capital of country number {uuid.uuid4().hex}?")


ANSWER = cache_pb2.CachedAnswer(
    deltas=[common_pb2.Delta(text="Paris.")],
    usage=common_pb2.Usage(input_tokens=8, output_tokens=2),
    finish_reason=common_pb2.FINISH_REASON_STOP,
    model=MODEL,
    provider="openai",
    cost_micros=75,
)


def edge_cache(channel: grpc.aio.Channel) -> EdgeCache:
    return EdgeCache(
        cache_pb2_grpc.CacheServiceStub(channel),
        max_temperature=0.0,
        lookup_timeout_s=5.0,
        store_timeout_s=5.0,
        store_linger_s=0.0,
        presence=True,
    )


async def store_in(servicer: CacheServicer, tenant: str, request: common_pb2.ChatRequest) -> None:
    """Store through a replica directly (as another edge's StoreMany would)."""
    response = await servicer.StoreMany(
        cache_pb2.StoreManyRequest(
            stores=[cache_pb2.StoreRequest(tenant_id=tenant, request=request, model=MODEL, answer=ANSWER)]
        ),
        None,
    )
    assert response.results[0].admitted


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.01)


async def test_a_miss_the_presence_vouches_for_spares_the_hop_and_still_counts() -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    replica = Replica(MemoryStore(max_bytes=1_000_000))
    server, channel = await serve_cache(replica)
    cache = edge_cache(channel)
    made = hits = 0

    async def look(request: common_pb2.ChatRequest) -> bool:
        nonlocal made, hits
        made += 1
        found = await cache.lookup(tenant, request, MODEL) is not None
        hits += found
        return found

    try:
        # The first lookup asks (and its call asks for the presence, which comes first).
        assert not await look(unique())
        assert replica.asked == 1
        for _ in range(5):  # sure misses: answered here
            assert not await look(unique())
        assert replica.asked == 1

        # What this edge stores it knows once the cache has admitted it: the lookup asks, and hits.
        question = unique()
        cache.offer(tenant, question, MODEL, ANSWER)
        await eventually(lambda: look(question))
        assert replica.asked == 2

        # A key another edge stored reaches this one by the presence.
        elsewhere = unique()
        await store_in(replica, tenant, elsewhere)
        await eventually(lambda: look(elsewhere))
        asked = replica.asked
        assert not await look(unique())
        assert replica.asked == asked

        # Every lookup counts in the cache's stats, those answered at the edge included.
        async def counted() -> bool:
            stats = await cache_pb2_grpc.CacheServiceStub(channel).GetStats(
                cache_pb2.GetStatsRequest(tenant_id=tenant), timeout=5
            )
            return (stats.lookups, stats.exact_hits) == (made, hits)

        await eventually(counted)
        assert hits == 2 and made > replica.asked
    finally:
        await cache.aclose()
        await channel.close()
        await server.stop(grace=None)


async def hit_of(cache: EdgeCache, tenant: str, request: common_pb2.ChatRequest) -> bool:
    return await cache.lookup(tenant, request, MODEL) is not None


async def test_with_semantic_matching_on_every_lookup_is_asked() -> None:
    replica = Replica(MemoryStore(max_bytes=1_000_000), presence=KeyPresence(off=SEMANTIC_ON))
    server, channel = await serve_cache(replica)
    cache = edge_cache(channel)
    try:
        for _ in range(4):
            assert await cache.lookup("acme", unique(), MODEL) is None
        assert replica.asked == 4
    finally:
        await cache.aclose()
        await channel.close()
        await server.stop(grace=None)


async def test_replicas_sharing_redis_vouch_for_each_others_keys_and_ask_all_while_cut_off() -> None:
    redis = RedisServer()
    await redis.start()
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    clients: list[Redis] = []

    def client() -> Redis:
        clients.append(open_redis(redis.url, options=FAST))
        return clients[-1]

    tenant = "acme"
    peer = CacheServicer(RedisStore(client(), prefix=prefix, max_bytes=1_000_000, announce=1_000))
    before = ask("Stored before the replica started?")
    await store_in(peer, tenant, before)

    presence = KeyPresence(down=LOADING)
    replica = Replica(
        RedisStore(client(), prefix=prefix, max_bytes=1_000_000, announce=1_000), presence=presence
    )
    feed = PresenceFeed(client(), prefix=prefix)
    await feed.start(presence)
    server, channel = await serve_cache(replica)
    cache = edge_cache(channel)
    try:
        assert not presence.off  # loaded: the key stored before is in
        assert await hit_of(cache, tenant, before)
        asked = replica.asked
        assert await cache.lookup(tenant, unique(), MODEL) is None
        assert replica.asked == asked  # a sure miss

        later = ask("Stored by the peer while this one serves?")
        await store_in(peer, tenant, later)  # announced on Redis, followed by the replica
        await eventually(lambda: hit_of(cache, tenant, later))

        await redis.stop()  # cut off: the replica cannot vouch for a miss any more
        await eventually(lambda: _true(bool(presence.off)))
        asked = replica.asked
        await eventually(lambda: _asked(cache, replica, asked))

        await redis.start()  # back (empty: an in-memory server): the keys are read whole again
        await eventually(lambda: _true(not presence.off))
        again = ask("Stored after the outage?")
        await store_in(peer, tenant, again)
        await eventually(lambda: hit_of(cache, tenant, again))
        asked = replica.asked
        assert await cache.lookup(tenant, unique(), MODEL) is None
        assert replica.asked == asked
    finally:
        await cache.aclose()
        await channel.close()
        await server.stop(grace=None)
        await feed.close()
        for c in clients:
            await c.aclose()
        await redis.stop()
        redis.cleanup()


async def _true(value: bool) -> bool:
    return value


async def _asked(cache: EdgeCache, replica: Replica, before: int) -> bool:
    """A lookup of a new question reaches the replica (the edge no longer vouches for misses)."""
    await cache.lookup("acme", unique(), MODEL)
    return replica.asked > before
