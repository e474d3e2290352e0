"""In-flight dedup: one upstream call shared by identical requests, fan-out, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from redis.asyncio import Redis

from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.settings import Settings
from switchyard.edge.dedup import InflightDedup, as_joiner, build_dedup, request_key
from switchyard.edge.dedup_redis import RedisDedup
from switchyard.v1 import common_pb2


def chat(text: str = "hello", request_id: str = "", **extra: object) -> common_pb2.ChatRequest:
    message = common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])
    return common_pb2.ChatRequest(
        model="openai/gpt-4o-mini", messages=[message], request_id=request_id, **extra
    )


class Upstream:
    """A stand-in pipeline: counts calls and closes, sends one chunk per permit."""

    def __init__(self, chunks: int = 3) -> None:
        self.calls = 0
        self.closed = 0
        self.chunks = chunks
        self.permits = asyncio.Semaphore(0)

    def allow(self, n: int = 100) -> None:
        for _ in range(n):
            self.permits.release()

    async def source(self) -> AsyncIterator[common_pb2.ChatChunk]:
        self.calls += 1
        try:
            for i in range(self.chunks):
                await self.permits.acquire()
                yield common_pb2.ChatChunk(delta=common_pb2.Delta(text=f"t{i} "))
            yield common_pb2.ChatChunk(done=common_pb2.Done(cost_micros=42, request_id="leader"))
        finally:
            self.closed += 1


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_key_ignores_request_id_and_cache_policy_but_not_tenant_or_content() -> None:
    base = request_key("t1", chat(request_id="a"))
    assert base == request_key("t1", chat(request_id="b", cache=common_pb2.CachePolicy(ttl_seconds=5)))
    assert base != request_key("t2", chat(request_id="a"))
    assert base != request_key("t1", chat("other", request_id="a"))
    assert base != request_key("t1", chat(sampling=common_pb2.SamplingParams(temperature=0.5)))


async def drain(stream: AsyncIterator[common_pb2.ChatChunk]) -> list[common_pb2.ChatChunk]:
    return [chunk async for chunk in stream]


async def test_identical_requests_share_one_call_and_get_the_same_chunks() -> None:
    dedup = InflightDedup()
    upstream = Upstream()
    key = request_key("t", chat())
    tasks = [asyncio.create_task(drain(dedup.stream(key, f"r{i}", upstream.source))) for i in range(5)]
    await settle()
    upstream.allow()
    results = await asyncio.gather(*tasks)
    assert upstream.calls == 1 and dedup.shared == 4
    texts = ["".join(c.delta.text for c in chunks) for chunks in results]
    assert texts == ["t0 t1 t2 "] * 5
    dones = [chunks[-1].done for chunks in results]
    assert (dones[0].cost_micros, dones[0].request_id) == (42, "leader")
    for i, done in enumerate(dones[1:], start=1):
        assert (done.cost_micros, done.saved_micros) == (0, 42)
        assert done.cache_status == common_pb2.CACHE_STATUS_DEDUPLICATED
        assert done.request_id == f"r{i}"
    assert len(dedup) == 0
    # Finished flights are forgotten: the next identical request calls upstream again.
    upstream.allow()
    await drain(dedup.stream(key, "later", upstream.source))
    assert upstream.calls == 2


async def test_a_late_joiner_replays_what_it_missed() -> None:
    dedup = InflightDedup()
    upstream = Upstream(chunks=4)
    key = request_key("t", chat())
    first = dedup.stream(key, "r0", upstream.source)
    upstream.allow(2)
    received = [await anext(first), await anext(first)]
    late = asyncio.create_task(drain(dedup.stream(key, "r1", upstream.source)))
    await settle()
    upstream.allow()
    received.extend(await drain(first))
    late_chunks = await late
    assert [c.delta.text for c in late_chunks[:-1]] == [c.delta.text for c in received[:-1]]
    assert upstream.calls == 1


async def test_a_waiter_that_leaves_does_not_cancel_the_others() -> None:
    dedup = InflightDedup()
    upstream = Upstream()
    key = request_key("t", chat())
    leaving = dedup.stream(key, "r0", upstream.source)
    staying = asyncio.create_task(drain(dedup.stream(key, "r1", upstream.source)))
    upstream.allow(1)
    await anext(leaving)
    await leaving.aclose()
    upstream.allow()
    chunks = await staying
    assert "".join(c.delta.text for c in chunks) == "t0 t1 t2 "
    assert upstream.calls == 1 and upstream.closed == 1


async def test_the_last_waiter_leaving_closes_the_upstream() -> None:
    dedup = InflightDedup()
    upstream = Upstream()
    key = request_key("t", chat())
    tasks = [asyncio.create_task(drain(dedup.stream(key, f"r{i}", upstream.source))) for i in range(2)]
    await settle()
    assert upstream.calls == 1 and upstream.closed == 0
    tasks[0].cancel()
    await settle()
    assert upstream.closed == 0  # one waiter is still there
    tasks[1].cancel()
    await settle()
    assert upstream.closed == 1 and len(dedup) == 0


async def test_an_error_reaches_every_waiter() -> None:
    dedup = InflightDedup()
    key = request_key("t", chat())

    async def failing() -> AsyncIterator[common_pb2.ChatChunk]:
        yield common_pb2.ChatChunk(delta=common_pb2.Delta(text="partial"))
        await asyncio.sleep(0)
        raise SwitchyardError(grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE, "down")

    async def expect_error(request_id: str) -> list[str]:
        seen: list[str] = []
        with pytest.raises(SwitchyardError):
            async for chunk in dedup.stream(key, request_id, failing):
                seen.append(chunk.delta.text)
        return seen

    results = await asyncio.gather(expect_error("a"), expect_error("b"))
    assert results == [["partial"], ["partial"]]


def test_computing_the_key_leaves_the_request_as_it_was() -> None:
    request = chat(request_id="r-1", cache=common_pb2.CachePolicy(ttl_seconds=5))
    before = request.SerializeToString()
    request_key("t", request)
    assert request.SerializeToString() == before
    bare = chat(request_id="r-2")
    request_key("t", bare)
    assert not bare.HasField("cache") and bare.request_id == "r-2"


def test_a_joiner_copy_of_a_joiner_copy_keeps_the_saving_and_takes_the_new_request_id() -> None:
    done = common_pb2.ChatChunk(done=common_pb2.Done(cost_micros=42, request_id="leader"))
    followed = as_joiner(done, "r1")  # a flight followed on another replica...
    shared_again = as_joiner(followed, "r2")  # ...then shared in this process
    assert (shared_again.done.cost_micros, shared_again.done.saved_micros) == (0, 42)
    assert shared_again.done.cache_status == common_pb2.CACHE_STATUS_DEDUPLICATED
    assert shared_again.done.request_id == "r2" and followed.done.request_id == "r1"
    assert done.done.cost_micros == 42 and done.done.request_id == "leader"  # the original is untouched
    delta = common_pb2.ChatChunk(delta=common_pb2.Delta(text="x"))
    assert as_joiner(delta, "r1") is delta


async def test_closing_the_table_cancels_the_flights_still_running() -> None:
    dedup = InflightDedup()
    upstream = Upstream()
    waiter = asyncio.create_task(drain(dedup.stream(request_key("t", chat()), "r0", upstream.source)))
    await settle()
    assert upstream.calls == 1 and len(dedup) == 1
    await dedup.aclose()
    assert upstream.closed == 1 and len(dedup) == 0
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_build_dedup_follows_the_settings() -> None:
    assert build_dedup(Settings(edge_dedup=False)) is None
    assert build_dedup(Settings(edge_dedup=False, redis_url="redis://127.0.0.1:1/0")) is None
    assert isinstance(build_dedup(Settings()), InflightDedup)
    # Building never touches the network: a Redis that is not there is only found per request.
    owned = build_dedup(Settings(redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(owned, RedisDedup)
    await owned.aclose()
    client = CountingRedis()
    given = build_dedup(Settings(), redis=client)
    assert isinstance(given, RedisDedup)
    await given.aclose()
    assert client.closes == 0  # a client passed in stays the caller's
    await RedisDedup(client, owns_client=True).aclose()
    assert client.closes == 1


class CountingRedis(Redis):
    """A client that counts `aclose` calls (it never connects in these tests)."""

    closes = 0

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        self.closes += 1
        await super().aclose(close_connection_pool)
