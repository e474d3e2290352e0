"""The cache's LookupStream over real gRPC: answers by id, and drains at shutdown."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from switchyard.cache.service import CacheServicer
from switchyard.cache.store import MemoryStore
from switchyard.common.errors import Reason, from_status
from switchyard.common.server import SERVER_OPTIONS, ErrorInterceptor
from switchyard.v1 import cache_pb2, cache_pb2_grpc, common_pb2


def lookup(text: str) -> cache_pb2.LookupRequest:
    message = common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])
    return cache_pb2.LookupRequest(
        tenant_id="acme", model="openai/gpt-4o-mini", request=common_pb2.ChatRequest(messages=[message])
    )


async def test_a_draining_cache_refuses_new_lookups_and_ends_the_stream() -> None:
    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000))
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS)
    cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = cache_pb2_grpc.CacheServiceStub(channel).LookupStream()
    try:
        await call.write(cache_pb2.LookupStreamRequest(id=1, lookup=lookup("first")))
        first = await call.read()
        assert first.id == 1 and first.lookup.status == common_pb2.CACHE_STATUS_MISS
        servicer.drain()
        # The stream may already have ended (nothing was running): then the write fails.
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(cache_pb2.LookupStreamRequest(id=2, lookup=lookup("second")))
        async with asyncio.timeout(5):
            answers = []
            while (answer := await call.read()) is not grpc.aio.EOF:
                answers.append(answer)
        assert await call.code() is grpc.StatusCode.OK  # the stream ended by itself
    finally:
        await channel.close()
        await server.stop(grace=None)
    # Lookup 2 raced the end of the stream: refused (a miss to the edge) or never read.
    assert all(a.id == 2 for a in answers)
    for answer in answers:
        error = from_status(answer.error)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.DEPENDENCY_UNAVAILABLE)


async def test_a_frame_of_lookups_is_answered_by_id_in_frames() -> None:
    # A refused lookup is answered with its error; the others in the frame are answered too.
    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000))
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS)
    cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = cache_pb2_grpc.CacheServiceStub(channel).LookupFrames()
    refused = cache_pb2.LookupRequest(model="openai/gpt-4o-mini")  # no tenant
    items = [cache_pb2.LookupStreamRequest(id=i, lookup=lookup(f"question {i}")) for i in (1, 2, 3)]
    items.insert(1, cache_pb2.LookupStreamRequest(id=9, lookup=refused))
    answers: dict[int, cache_pb2.LookupStreamResponse] = {}
    try:
        await call.write(cache_pb2.LookupFramesRequest(items=items))
        await call.done_writing()
        async with asyncio.timeout(5):
            while (message := await call.read()) is not grpc.aio.EOF:
                for answer in message.items:
                    answers[answer.id] = answer
        assert await call.code() is grpc.StatusCode.OK
    finally:
        await channel.close()
        await server.stop(grace=None)
    assert sorted(answers) == [1, 2, 3, 9]
    for lookup_id in (1, 2, 3):
        assert answers[lookup_id].lookup.status == common_pb2.CACHE_STATUS_MISS
    error = from_status(answers[9].error)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
