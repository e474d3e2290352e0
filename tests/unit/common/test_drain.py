"""`StreamDrain`: at shutdown a long-lived stream sends what it has queued and ends, reads no
further request, and new streams are refused as shutting down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from switchyard.common.drain import DRAINED, StreamDrain
from switchyard.common.errors import Reason, SwitchyardError, is_shutting_down


async def test_queued_items_come_first_then_the_stream_is_drained() -> None:
    drain = StreamDrain("router")
    queue: asyncio.Queue[int] = asyncio.Queue()
    queue.put_nowait(1)
    assert await drain.next(queue) == 1
    waiting = asyncio.create_task(drain.next(queue))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    queue.put_nowait(2)
    queue.put_nowait(3)
    assert await waiting == 2
    drain.drain()
    assert await drain.next(queue) == 3  # already queued: still sent
    assert await drain.next(queue) is DRAINED
    assert queue.empty()


async def test_a_waiting_stream_is_woken_by_the_drain_and_takes_nothing_from_its_queue() -> None:
    drain = StreamDrain("router")
    queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(3)]
    waiting = [asyncio.create_task(drain.next(q)) for q in queues]
    await asyncio.sleep(0.01)
    drain.drain()
    async with asyncio.timeout(1):
        assert await asyncio.gather(*waiting) == [DRAINED] * 3
    queues[0].put_nowait(7)  # the cancelled waits left no getter behind to swallow it
    assert queues[0].get_nowait() == 7


async def test_next_times_out_when_nothing_comes() -> None:
    drain = StreamDrain("ledger")
    queue: asyncio.Queue[int] = asyncio.Queue()
    with pytest.raises(TimeoutError):
        await drain.next(queue, timeout_s=0.01)
    queue.put_nowait(5)
    assert await drain.next(queue, timeout_s=0.01) == 5


async def test_requests_are_read_until_the_caller_ends_them() -> None:
    async def requests() -> AsyncIterator[int]:
        for n in range(3):
            yield n

    drain = StreamDrain("ledger")
    assert [r async for r in drain.until_drained(requests())] == [0, 1, 2]


async def test_no_request_is_read_after_the_drain_and_the_one_in_hand_is_handed_on() -> None:
    arrived: asyncio.Queue[int] = asyncio.Queue()
    read: list[int] = []

    async def requests() -> AsyncIterator[int]:
        while True:
            item = await arrived.get()
            read.append(item)
            yield item

    drain = StreamDrain("ledger")
    handled: list[int] = []

    async def serve() -> None:
        async for request in drain.until_drained(requests()):
            if request == 1:
                drain.drain()  # shutdown begins while request 1 is being handled
            handled.append(request)

    serving = asyncio.create_task(serve())
    arrived.put_nowait(0)
    arrived.put_nowait(1)
    arrived.put_nowait(2)
    async with asyncio.timeout(1):
        await serving
    assert handled == [0, 1] and read == [0, 1]  # request 2 was left unread
    assert arrived.get_nowait() == 2


async def test_a_stream_waiting_for_its_next_request_ends_at_once_when_the_drain_begins() -> None:
    async def silent() -> AsyncIterator[int]:
        await asyncio.Event().wait()
        yield 0

    drain = StreamDrain("ledger")
    waiting = asyncio.create_task(anext(aiter(drain.until_drained(silent())), None))
    await asyncio.sleep(0.01)
    drain.drain()
    async with asyncio.timeout(1):
        assert await waiting is None


async def test_new_streams_are_refused_unavailable_as_shutting_down() -> None:
    drain = StreamDrain("health monitor")
    drain.refuse_if_draining()  # not draining: nothing happens
    drain.drain()
    assert drain.draining
    with pytest.raises(SwitchyardError) as caught:
        drain.refuse_if_draining()
    refusal = caught.value
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.DEPENDENCY_UNAVAILABLE)
    assert refusal.message == "the health monitor is shutting down"
    assert is_shutting_down(refusal)
    # As the caller reads it back off the wire.
    received = grpc.aio.AioRpcError(
        refusal.code, grpc.aio.Metadata(), grpc.aio.Metadata(*refusal.trailing_metadata()), refusal.message
    )
    assert is_shutting_down(received)
    bare = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
    assert not is_shutting_down(bare)  # a peer that is unreachable is not one going away
