"""`FrameQueue`: what a framed call's writer takes at each write."""

from __future__ import annotations

import asyncio

import pytest

from switchyard.common import multiplex
from switchyard.common.multiplex import FrameQueue
from switchyard.v1 import cache_pb2


def item(item_id: int, text_bytes: int = 0) -> cache_pb2.LookupStreamRequest:
    request = cache_pb2.LookupStreamRequest(id=item_id)
    if text_bytes:
        request.lookup.request.messages.add().parts.add(text="x" * text_bytes)
    return request


async def test_a_frame_takes_everything_waiting_in_order_and_waits_for_a_first_item() -> None:
    queue: FrameQueue[cache_pb2.LookupStreamRequest] = FrameQueue()
    waiting = asyncio.ensure_future(queue.frame())
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.put(item(1))
    assert [i.id for i in await waiting or []] == [1]  # nothing is held back to fill a frame
    for item_id in (2, 3, 4):
        queue.put(item(item_id))
    assert [i.id for i in await queue.frame() or []] == [2, 3, 4]


async def test_frames_are_bounded_by_count_and_bytes_and_a_big_item_goes_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(multiplex, "FRAME_BYTES", 1000)
    queue: FrameQueue[cache_pb2.LookupStreamRequest] = FrameQueue(max_items=3)
    for item_id in range(1, 6):
        queue.put(item(item_id))
    queue.put(item(6, text_bytes=400))
    queue.put(item(7, text_bytes=400))
    queue.put(item(8, text_bytes=400))
    queue.put(item(9, text_bytes=5000))  # above the limit on its own
    queue.put(item(10))
    frames = []
    queue.close()
    while (frame := await queue.frame()) is not None:
        frames.append([i.id for i in frame])
    assert frames == [[1, 2, 3], [4, 5, 6], [7, 8], [9], [10]]


async def test_one_item_a_frame_for_a_call_without_frames_and_none_once_closed_and_empty() -> None:
    queue: FrameQueue[cache_pb2.LookupStreamRequest] = FrameQueue(max_items=1)
    queue.put(item(1))
    queue.put(item(2))
    queue.close()
    assert [[i.id for i in f] for f in (await queue.frame(), await queue.frame()) if f] == [[1], [2]]
    assert await queue.frame() is None


class Hold:
    """A `FrameHold` that allows `delay_s` until `enough` items wait, counting its calls."""

    def __init__(
        self, queue: FrameQueue[cache_pb2.LookupStreamRequest] | None, delay_s: float, enough: int
    ) -> None:
        self.queue = queue
        self.delay_s = delay_s
        self.enough = enough
        self.calls = 0

    def __call__(self, gathered: int) -> float:
        self.calls += 1
        assert self.queue is not None
        assert gathered == len(self.queue)  # told how many the frame holds
        return 0.0 if gathered >= self.enough else self.delay_s


def held_queue(delay_s: float, enough: int) -> tuple[FrameQueue[cache_pb2.LookupStreamRequest], Hold]:
    hold = Hold(None, delay_s, enough)
    queue: FrameQueue[cache_pb2.LookupStreamRequest] = FrameQueue(hold=hold)
    hold.queue = queue
    return queue, hold


async def test_a_held_frame_gathers_what_comes_and_goes_as_soon_as_the_hold_says_so() -> None:
    queue, hold = held_queue(delay_s=60.0, enough=3)
    waiting = asyncio.ensure_future(queue.frame())
    await asyncio.sleep(0)
    queue.put(item(1))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()  # the first item waits for company
    queue.put(item(2))
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.put(item(3))  # enough: the hold says go, long before its 60 s
    async with asyncio.timeout(5):
        assert [i.id for i in await waiting or []] == [1, 2, 3]


async def test_a_held_frame_goes_when_its_time_is_up_with_what_it_has() -> None:
    queue, _ = held_queue(delay_s=0.02, enough=10)
    waiting = asyncio.ensure_future(queue.frame())
    await asyncio.sleep(0)
    queue.put(item(1))
    queue.put(item(2))
    async with asyncio.timeout(5):
        assert [i.id for i in await waiting or []] == [1, 2]


async def test_a_busy_writer_never_holds_and_nor_does_a_call_without_frames() -> None:
    queue, hold = held_queue(delay_s=60.0, enough=10)
    queue.put(item(1))
    queue.put(item(2))
    async with asyncio.timeout(5):  # items were waiting for the writer: they go at once
        assert [i.id for i in await queue.frame() or []] == [1, 2]
    assert hold.calls == 0

    single: FrameQueue[cache_pb2.LookupStreamRequest] = FrameQueue(max_items=1, hold=lambda _: 60.0)
    waiting = asyncio.ensure_future(single.frame())
    await asyncio.sleep(0)
    single.put(item(3))
    async with asyncio.timeout(5):
        assert [i.id for i in await waiting or []] == [3]


async def test_closing_ends_a_hold_and_the_queue_then_ends() -> None:
    queue, _ = held_queue(delay_s=60.0, enough=10)
    waiting = asyncio.ensure_future(queue.frame())
    await asyncio.sleep(0)
    queue.put(item(1))
    await asyncio.sleep(0)
    queue.close()
    async with asyncio.timeout(5):
        assert [i.id for i in await waiting or []] == [1]
        assert await queue.frame() is None


async def test_a_hold_of_zero_sends_at_once() -> None:
    queue, hold = held_queue(delay_s=0.0, enough=10)
    waiting = asyncio.ensure_future(queue.frame())
    await asyncio.sleep(0)
    queue.put(item(1))
    async with asyncio.timeout(5):
        assert [i.id for i in await waiting or []] == [1]
    assert hold.calls == 1
