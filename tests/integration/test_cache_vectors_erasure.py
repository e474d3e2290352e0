"""An end user's erasure reaches every cache replica's semantic index and the vector feed they
share, on a real Redis.

The feed's purge runs against a private stream; the replicas are the cache service's own
`build` (a tiered store on Redis, the real local embedder, the shared `VECTOR_STREAM`) served
over real gRPC in this process, three of them, the third started after the erasure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from redis.asyncio import Redis

from switchyard.cache import service as cache_service
from switchyard.cache.keys import cache_key
from switchyard.cache.store import CacheEntry, RedisStore
from switchyard.cache.vectors import VECTOR_STREAM, IndexedQuestion, RemovedQuestions, VectorFeed, decode
from switchyard.common.channels import open_channel
from switchyard.common.errors import SwitchyardError
from switchyard.common.ports import free_port
from switchyard.common.redis_client import open_redis
from switchyard.common.server import ServiceParts, build_server
from switchyard.common.settings import Settings
from switchyard.v1 import cache_pb2, cache_pb2_grpc, common_pb2

MODEL = "openai/gpt-4o-mini"
ALICE_QUESTION = "How do I reset my password?"
ALICE_PARAPHRASE = "How can I reset my password?"
BOB_QUESTION = "What is the capital of France?"
BOB_PARAPHRASE = "Which city is the capital of France?"
ERASURE_KEY = "erasure-key-vectors-test-0123456789"
# How long a replica may take to see what another published (its follower blocks 1 s at a time).
FEED_DEADLINE_S = 10.0


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def question(key: str, end_user_hash: str = "") -> IndexedQuestion:
    return IndexedQuestion(key, "scope", frozenset(), b"\x00" * 16, 4_000_000_000.0, end_user_hash)


async def stream_records(client: Redis, stream: str) -> list[object]:
    """What the stream holds, oldest first; an entry that is not ours as its raw fields."""
    records: list[object] = []
    for _, fields in await client.xrange(stream):
        try:
            records.append(decode(fields[b"b"]))
        except Exception:
            records.append(fields)
    return records


async def test_a_purge_deletes_every_question_older_than_a_tombstone_naming_it(redis_client: Redis) -> None:
    stream = f"test:cache:vectors:{uuid.uuid4().hex}"
    feed = VectorFeed(redis_client, stream=stream, page=3)  # pages smaller than the stream
    try:
        for record in [
            question("t/m/a1", "h-alice"),
            question("t/m/b1", "h-bob"),
            question("t/m/c1"),
            question("t/m/a2", "h-alice"),
            question("t/m/k"),
        ]:
            await feed.publish(record)
        await redis_client.xadd(stream, {"x": "not ours"})
        await redis_client.xadd(stream, {"b": b"\x00\x00"})
        tombstone = RemovedQuestions(("t/m/k",), "h-alice")
        await feed.publish(tombstone)
        await feed.publish(question("t/m/a3", "h-alice"))  # stored again after the erasure
        await feed.publish(question("t/m/k"))

        assert await feed.purge_removed() == 3
        remaining = await stream_records(redis_client, stream)
        assert remaining == [
            question("t/m/b1", "h-bob"),
            question("t/m/c1"),
            {b"x": b"not ours"},
            {b"b": b"\x00\x00"},
            tombstone,
            question("t/m/a3", "h-alice"),
            question("t/m/k"),
        ]
        assert await feed.purge_removed() == 0
        # A replica starting now indexes what survived, tombstones applied after.
        history = await feed.history()
        assert [getattr(r, "key", None) for r in history] == ["t/m/b1", "t/m/c1", None, "t/m/a3", "t/m/k"]
    finally:
        await redis_client.delete(stream)


async def test_a_purge_without_redis_is_unavailable() -> None:
    client = open_redis(f"redis://127.0.0.1:{free_port()}")
    feed = VectorFeed(client, stream="test:cache:vectors:nowhere")
    try:
        with pytest.raises(SwitchyardError) as caught:
            await feed.purge_removed()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await feed.close()


@contextlib.asynccontextmanager
async def replica(settings: Settings) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    """A cache replica built and started as `switchyard serve cache` does, served on a free port."""
    parts: ServiceParts = cache_service.build(settings)
    if parts.start is not None:
        await parts.start()
    running = await build_server(parts.bindings)
    channel = open_channel(f"127.0.0.1:{running.port}")
    try:
        yield cache_pb2_grpc.CacheServiceStub(channel)
    finally:
        await channel.close()
        await running.server.stop(None)
        if parts.close is not None:
            await parts.close()


def ask(text: str) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=MODEL)
    request.messages.add(role=common_pb2.ROLE_USER).parts.add(text=text)
    request.sampling.temperature = 0.0
    return request


def cached_answer(text: str) -> cache_pb2.CachedAnswer:
    return cache_pb2.CachedAnswer(
        deltas=[common_pb2.Delta(text=text)],
        finish_reason=common_pb2.FINISH_REASON_STOP,
        model=MODEL,
        provider="openai",
        cost_micros=75,
    )


async def status(cache: cache_pb2_grpc.CacheServiceStub, tenant: str, text: str) -> int:
    reply = await cache.Lookup(
        cache_pb2.LookupRequest(tenant_id=tenant, request=ask(text), model=MODEL), timeout=10
    )
    return reply.status


async def until(cache: cache_pb2_grpc.CacheServiceStub, tenant: str, text: str, wanted: int) -> None:
    """Look `text` up until the answer is `wanted`, within `FEED_DEADLINE_S`."""
    deadline = asyncio.get_running_loop().time() + FEED_DEADLINE_S
    while (got := await status(cache, tenant, text)) != wanted:
        assert asyncio.get_running_loop().time() < deadline, f"{text!r}: {got}, not {wanted}"
        await asyncio.sleep(0.05)


async def test_an_erasure_leaves_no_vector_on_any_replica_or_the_shared_feed(
    redis_url: str, redis_client: Redis
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env({}, redis_url=redis_url, ledger_erasure_key=ERASURE_KEY, cache_semantic=True)
    alice_key = cache_key(tenant, ask(ALICE_QUESTION), MODEL)
    bob_key = cache_key(tenant, ask(BOB_QUESTION), MODEL)
    store = RedisStore(redis_client, max_bytes=settings.cache_max_bytes, end_user_key=ERASURE_KEY.encode())
    alice_hash = await store.end_user_digest(tenant, "alice")
    hit = common_pb2.CACHE_STATUS_HIT_SEMANTIC
    miss = common_pb2.CACHE_STATUS_MISS

    async def feed_questions() -> dict[str, IndexedQuestion]:
        return {
            r.key: r
            for r in await stream_records(redis_client, VECTOR_STREAM)
            if isinstance(r, IndexedQuestion) and r.key in (alice_key, bob_key)
        }

    async with replica(settings) as first, replica(settings) as second:
        for text, end_user in ((ALICE_QUESTION, "alice"), (BOB_QUESTION, "bob")):
            stored = await first.Store(
                cache_pb2.StoreRequest(
                    tenant_id=tenant,
                    request=ask(text),
                    model=MODEL,
                    answer=cached_answer(f"answer to {text}"),
                    end_user=end_user,
                ),
                timeout=10,
            )
            assert stored.admitted
        await until(second, tenant, ALICE_PARAPHRASE, hit)  # the second replica indexed it
        await until(second, tenant, BOB_PARAPHRASE, hit)
        shared = await feed_questions()
        assert set(shared) == {alice_key, bob_key} and shared[alice_key].end_user_hash == alice_hash

        erased = await first.Invalidate(
            cache_pb2.InvalidateRequest(tenant_id=tenant, end_user="alice"), timeout=30
        )
        assert erased.removed == 1
        # The feed keeps nothing of hers for a replica to index.
        assert set(await feed_questions()) == {bob_key}
        assert not [
            r
            for r in await stream_records(redis_client, VECTOR_STREAM)
            if isinstance(r, IndexedQuestion) and r.end_user_hash == alice_hash
        ]
        # Her entry back in the store, anonymous and without a vector: a replica that still had
        # her vector would answer her paraphrase from it.
        now = time.time()
        await store.put(
            CacheEntry(
                key=alice_key,
                tenant_id=tenant,
                model=MODEL,
                payload=cached_answer("planted").SerializeToString(),
                cost_micros=75,
                stored_at=now,
                expires_at=now + 120,
            )
        )
        try:
            await until(second, tenant, ALICE_PARAPHRASE, miss)  # the tombstone reached it
            assert await status(first, tenant, ALICE_PARAPHRASE) == miss
            async with replica(settings) as late:
                assert await status(late, tenant, ALICE_PARAPHRASE) == miss
                assert await status(late, tenant, ALICE_QUESTION) == common_pb2.CACHE_STATUS_HIT_EXACT
                for cache in (first, second, late):
                    assert await status(cache, tenant, BOB_PARAPHRASE) == hit

                # Again: nothing left to remove, nothing else touched.
                again = await second.Invalidate(
                    cache_pb2.InvalidateRequest(tenant_id=tenant, end_user="alice"), timeout=30
                )
                assert again.removed == 0
                assert set(await feed_questions()) == {bob_key}
                for cache in (first, second, late):
                    assert await status(cache, tenant, BOB_PARAPHRASE) == hit
                    assert await status(cache, tenant, ALICE_PARAPHRASE) == miss
        finally:
            await store.invalidate(tenant_id=tenant)
