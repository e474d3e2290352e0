"""The edge's lookup stream retired by age, against real cache servers over gRPC (in process).

Under steady lookups the stream is never idle; retired by age, it reaches a cache replica
added mid-run, every lookup is answered (hits stay hits), and each old call ends cleanly:
the cache finishes it once the edge has closed its side, so it ends OK, not cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from switchyard.cache.service import CacheServicer
from switchyard.cache.store import MemoryStore
from switchyard.edge.cache import StreamedLookups
from switchyard.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from tests.support.cache_server import serve_cache

MODEL = "openai/gpt-4o-mini"


class CountedReplica(cache_pb2_grpc.CacheServiceServicer):
    """One cache replica: the shared servicer (one store, as replicas on one Redis), counting
    the lookups its streams carry."""

    def __init__(self, servicer: CacheServicer) -> None:
        self._servicer = servicer
        self.lookups = 0

    async def LookupFrames(
        self, frames: AsyncIterator[cache_pb2.LookupFramesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cache_pb2.LookupFramesResponse]:
        async def counted() -> AsyncIterator[cache_pb2.LookupFramesRequest]:
            async for frame in frames:
                self.lookups += len(frame.items)
                yield frame

        async for reply in self._servicer.LookupFrames(counted(), context):
            yield reply


class Balancer:
    """Each new call goes to the next replica, as through Envoy; `replicas` may grow."""

    def __init__(self, *replicas: cache_pb2_grpc.CacheServiceStub) -> None:
        self.replicas = list(replicas)
        self.calls: list[grpc.aio.StreamStreamCall] = []

    def LookupFrames(self) -> object:
        call = self.replicas[len(self.calls) % len(self.replicas)].LookupFrames()
        self.calls.append(call)
        return call


def lookup(text: str) -> cache_pb2.LookupRequest:
    request = common_pb2.ChatRequest(model=MODEL)
    request.messages.add(role=common_pb2.ROLE_USER).parts.add(text=text)
    request.sampling.temperature = 0.0
    request.cache.semantic_threshold = 1.0
    return cache_pb2.LookupRequest(tenant_id="acme", request=request, model=MODEL)


async def test_a_lookup_stream_past_its_age_moves_to_a_replica_added_under_load() -> None:
    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000))
    stored = lookup("What is the capital of France?")
    answer = cache_pb2.CachedAnswer(
        deltas=[common_pb2.Delta(text="Paris.")],
        usage=common_pb2.Usage(input_tokens=8, output_tokens=2),
        finish_reason=common_pb2.FINISH_REASON_STOP,
        model=MODEL,
        provider="openai",
        cost_micros=75,
    )
    await servicer.StoreMany(  # type: ignore[arg-type]
        cache_pb2.StoreManyRequest(
            stores=[
                cache_pb2.StoreRequest(tenant_id="acme", request=stored.request, model=MODEL, answer=answer)
            ]
        ),
        None,
    )
    first, added = CountedReplica(servicer), CountedReplica(servicer)
    (server_a, channel_a), (server_b, channel_b) = await serve_cache(first), await serve_cache(added)
    stub = Balancer(cache_pb2_grpc.CacheServiceStub(channel_a))
    lookups = StreamedLookups(stub, max_age_s=0.1)  # type: ignore[arg-type]
    statuses: list[int] = []

    async def load(seconds: float) -> None:
        until = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < until:
            found = await asyncio.gather(
                lookups.ask(stored, timeout_s=5),
                lookups.ask(lookup("Something never asked before?"), timeout_s=5),
            )
            statuses.extend(f.status for f in found)
            await asyncio.sleep(0.005)

    try:
        await load(0.25)
        assert added.lookups == 0
        stub.replicas.append(cache_pb2_grpc.CacheServiceStub(channel_b))  # scale out
        await load(0.5)
        retired = stub.calls[:-1]
        async with asyncio.timeout(5):  # each ends once its last answer is out
            codes = {await call.code() for call in retired}
    finally:
        lookups.close()
        await channel_a.close()
        await channel_b.close()
        await server_a.stop(grace=None)
        await server_b.stop(grace=None)
    pairs = list(zip(statuses[::2], statuses[1::2], strict=True))
    assert set(pairs) == {(common_pb2.CACHE_STATUS_HIT_EXACT, common_pb2.CACHE_STATUS_MISS)}
    assert added.lookups > 0 and first.lookups + added.lookups == len(statuses)
    assert len(stub.calls) > 3 and codes == {grpc.StatusCode.OK}


class StreamOnlyCache(cache_pb2_grpc.CacheServiceServicer):
    """A cache build from before LookupFrames: LookupStream, a message each."""

    def __init__(self, servicer: CacheServicer) -> None:
        self._servicer = servicer
        self.lookups = 0

    async def LookupStream(
        self, requests: AsyncIterator[cache_pb2.LookupStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cache_pb2.LookupStreamResponse]:
        async def counted() -> AsyncIterator[cache_pb2.LookupStreamRequest]:
            async for item in requests:
                self.lookups += 1
                yield item

        async for reply in self._servicer.LookupStream(counted(), context):
            yield reply


async def test_a_cache_without_lookup_frames_gets_the_lookups_on_lookup_stream() -> None:
    older = StreamOnlyCache(CacheServicer(MemoryStore(max_bytes=1_000_000)))
    server, channel = await serve_cache(older)
    lookups = StreamedLookups(cache_pb2_grpc.CacheServiceStub(channel))  # type: ignore[arg-type]
    try:
        # The first lookups find no LookupFrames (UNIMPLEMENTED) and are asked again.
        found = await asyncio.gather(*(lookups.ask(lookup(f"question {i}?"), timeout_s=5) for i in range(3)))
        found.append(await lookups.ask(lookup("one more?"), timeout_s=5))
    finally:
        lookups.close()
        await channel.close()
        await server.stop(grace=None)
    assert [f.status for f in found] == [common_pb2.CACHE_STATUS_MISS] * 4
    assert not lookups.framed and older.lookups == 4
