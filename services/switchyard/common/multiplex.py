"""Serving a multiplexed bidirectional call: many requests on one call, answered by id.

A servicer method (`LookupStream`, `GenerateStream`) hands its request iterator to
`Multiplexer.serve` with what to do for each item; the items it starts run as tasks of their
own (at most `limit` at once: past it the call stops reading, so HTTP/2 flow control holds
the caller back), their answers go out through `send` in the order they are ready, and when
the caller ends the call every task still running is cancelled.

Framed calls (`serve_frames`: `LookupFrames`, `GenerateFrames`) carry in each message every
item its writer had waiting when it wrote (`FrameQueue`): a busy call then costs one message
where it cost many, and a message on a gRPC call costs far more CPU than the items it
carries. A server's answers are never held back; a caller may hold a frame briefly for
company (`FrameQueue`'s `hold`, which the edge uses only under concurrency).

At shutdown a servicer drains its calls (`Multiplexers.drain`): they take no new work (what
the servicer answers instead is its choice, `draining` tells it) and end, cleanly, as soon as
the work they run is done, so the server's grace period is spent finishing answers rather
than waiting on calls that would never end by themselves.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any, Final, Generic, Protocol, TypeVar

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Item = TypeVar("_Item", bound="_Sized")

# A frame holds at most this many items and, once it holds more than one, this many bytes of
# them (far below the 32 MiB a message may have; an item above it goes alone).
FRAME_ITEMS: Final = 256
FRAME_BYTES: Final = 4 * 1024 * 1024


class _Sized(Protocol):
    def ByteSize(self) -> int: ...


FrameHold = Callable[[int], float]
"""How long a frame of so many items may wait for company (asked again as items join it, with
their number; 0: go now)."""


class FrameQueue(Generic[_Item]):
    """Messages waiting for a writer, taken a frame at a time, in order.

    Sizes are read only when a second item would join a frame (a lone item goes as it is, so
    an idle call pays nothing for framing). `max_items` 1 makes every frame one item (for a
    call without frames). `close` ends the queue once what waits is taken.

    `hold`, when given, lets a frame whose first item found the writer idle wait for others:
    at most as long as `hold` first answers, and only while it keeps answering more than 0
    (it is asked again whenever an item joins, or `nudge` says its answer may have changed).
    Without it, nothing is held back.
    """

    def __init__(self, max_items: int = FRAME_ITEMS, hold: FrameHold | None = None) -> None:
        self._items: deque[_Item] = deque()
        self._max_items = max_items
        self._hold = hold if max_items > 1 else None
        self._holding = False
        self._closed = False
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        """Items waiting for the writer."""
        return len(self._items)

    def put(self, item: _Item) -> None:
        """Queue `item` (never blocks)."""
        self._items.append(item)
        self._ready.set()

    def nudge(self) -> None:
        """A held frame asks its `hold` again (what it waits for may have gone elsewhere)."""
        if self._holding:
            self._ready.set()

    def close(self) -> None:
        """No more items: `frame` returns None once what waits is taken."""
        self._closed = True
        self._ready.set()

    async def frame(self) -> list[_Item] | None:
        """The items waiting (waits for one), up to a frame's limits; None once closed and empty."""
        items = self._items
        waited = False
        while not items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
            waited = True
        if waited and self._hold is not None:
            self._holding = True
            try:
                await self._gather(self._hold)
            finally:
                self._holding = False
        frame = [items.popleft()]
        if items and self._max_items > 1:
            total = frame[0].ByteSize()
            while items and len(frame) < self._max_items:
                total += items[0].ByteSize()
                if total > FRAME_BYTES:
                    break
                frame.append(items.popleft())
        return frame

    async def _gather(self, hold: FrameHold) -> None:
        """Wait while `hold` says the frame may, up to its first answer, for more items."""
        delay = hold(len(self._items))
        if delay <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while not self._closed and len(self._items) < self._max_items:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._ready.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._ready.wait()
            except TimeoutError:
                return
            if hold(len(self._items)) <= 0:
                return


class Multiplexer(Generic[_Request, _Response]):
    """The running items and the outgoing answers of one multiplexed call."""

    def __init__(self, limit: int) -> None:
        self._out: FrameQueue[Any] = FrameQueue()
        self._slots = asyncio.Semaphore(limit)
        self._running: dict[int, asyncio.Task[None]] = {}
        self.draining = False
        """Shutting down: start no new work; the call ends once the running work is done."""
        self.ended = False
        """The call is over: what is sent now goes nowhere."""

    def drain(self) -> None:
        """Take no new work, and end the call as soon as nothing runs."""
        self.draining = True
        if not self._running:
            self._out.close()

    def send(self, response: _Response) -> None:
        """Queue an answer for the caller (never blocks)."""
        self._out.put(response)

    def running(self, key: int) -> bool:
        """Whether the item started under `key` is still running."""
        return key in self._running

    async def start(self, key: int, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task under `key`, once a slot is free."""
        try:
            await self._slots.acquire()
        except BaseException:  # the call ended while waiting: `work` never runs
            work.close()
            raise
        task = asyncio.create_task(work)
        self._running[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))

    def _finished(self, key: int, task: asyncio.Task[None]) -> None:
        self._slots.release()
        if self._running.get(key) is task:
            del self._running[key]
        if self.draining and not self._running:
            self._out.close()

    def cancel(self, key: int) -> None:
        """Cancel the item running under `key`, if any."""
        task = self._running.get(key)
        if task is not None:
            task.cancel()

    async def serve(
        self,
        frames: AsyncIterator[Any],
        unpack: Callable[[Any], Iterable[_Request]],
        on_item: Callable[[_Request], Awaitable[None]],
    ) -> AsyncIterator[list[_Response]]:
        """Read the call's messages, `unpack` each into items and call `on_item` for each item
        (it may `start`, `cancel` or `send`); yield the answers, as frames (every answer ready
        when the last frame was written), until the caller has finished and every item is done."""

        async def read() -> None:
            try:
                async for frame in frames:
                    for item in unpack(frame):
                        await on_item(item)
                if self._running:
                    await asyncio.wait(set(self._running.values()))
            finally:
                self._out.close()

        reader = asyncio.create_task(read())
        try:
            while (answers := await self._out.frame()) is not None:
                yield answers
        finally:
            self.ended = True
            reader.cancel()
            for task in list(self._running.values()):
                task.cancel()


class Multiplexers(Generic[_Request, _Response]):
    """The multiplexed calls one servicer method serves, so shutdown can drain them all."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._live: set[Multiplexer[_Request, _Response]] = set()
        self.draining = False

    async def serve(
        self,
        requests: AsyncIterator[_Request],
        on_item: Callable[[Multiplexer[_Request, _Response], _Request], Awaitable[None]],
    ) -> AsyncIterator[_Response]:
        """Serve one call, a message per item, with a `Multiplexer` of its own (see
        `Multiplexer.serve`); `on_item` gets that multiplexer with each item."""
        async for answers in self.serve_frames(requests, _alone, on_item):
            for response in answers:
                yield response

    async def serve_frames(
        self,
        frames: AsyncIterator[Any],
        unpack: Callable[[Any], Iterable[_Request]],
        on_item: Callable[[Multiplexer[_Request, _Response], _Request], Awaitable[None]],
    ) -> AsyncIterator[list[_Response]]:
        """Serve one framed call: each message is `unpack`ed into items, the answers are
        yielded as frames (see `Multiplexer.serve`)."""
        mux: Multiplexer[_Request, _Response] = Multiplexer(self._limit)
        if self.draining:
            mux.drain()
        self._live.add(mux)
        try:
            async for answers in mux.serve(frames, unpack, lambda item: on_item(mux, item)):
                yield answers
        finally:
            self._live.discard(mux)

    def drain(self) -> None:
        """Drain every call being served, and every call that comes after."""
        self.draining = True
        for mux in list(self._live):
            mux.drain()


def _alone(item: _Request) -> tuple[_Request]:
    return (item,)
