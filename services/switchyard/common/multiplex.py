"""Serving a multiplexed bidirectional call: many requests on one call, answered by id.

A servicer method (`LookupStream`, `GenerateStream`) hands its request iterator to
`Multiplexer.serve` with what to do for each item; the items it starts run as tasks of their
own (at most `limit` at once: past it the call stops reading, so HTTP/2 flow control holds
the caller back), their answers go out through `send` in the order they are ready, and when
the caller ends the call every task still running is cancelled.

At shutdown a servicer drains its calls (`Multiplexers.drain`): they take no new work (what
the servicer answers instead is its choice, `draining` tells it) and end, cleanly, as soon as
the work they run is done, so the server's grace period is spent finishing answers rather
than waiting on calls that would never end by themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class Multiplexer(Generic[_Request, _Response]):
    """The running items and the outgoing answers of one multiplexed call."""

    def __init__(self, limit: int) -> None:
        self._out: asyncio.Queue[_Response | None] = asyncio.Queue()
        self._slots = asyncio.Semaphore(limit)
        self._running: dict[int, asyncio.Task[None]] = {}
        self.draining = False
        """Shutting down: start no new work; the call ends once the running work is done."""

    def drain(self) -> None:
        """Take no new work, and end the call as soon as nothing runs."""
        self.draining = True
        if not self._running:
            self._out.put_nowait(None)

    def send(self, response: _Response) -> None:
        """Queue an answer for the caller (never blocks)."""
        self._out.put_nowait(response)

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
            self._out.put_nowait(None)

    def cancel(self, key: int) -> None:
        """Cancel the item running under `key`, if any."""
        task = self._running.get(key)
        if task is not None:
            task.cancel()

    async def serve(
        self, requests: AsyncIterator[_Request], on_item: Callable[[_Request], Awaitable[None]]
    ) -> AsyncIterator[_Response]:
        """Read `requests`, calling `on_item` for each (it may `start`, `cancel` or `send`),
        and yield the answers until the caller has finished and every item is done."""

        async def read() -> None:
            try:
                async for item in requests:
                    await on_item(item)
                if self._running:
                    await asyncio.wait(set(self._running.values()))
            finally:
                self._out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await self._out.get()) is not None:
                yield response
        finally:
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
        """Serve one call with a `Multiplexer` of its own (see `Multiplexer.serve`);
        `on_item` gets that multiplexer with each item."""
        mux: Multiplexer[_Request, _Response] = Multiplexer(self._limit)
        if self.draining:
            mux.drain()
        self._live.add(mux)
        try:
            async for response in mux.serve(requests, lambda item: on_item(mux, item)):
                yield response
        finally:
            self._live.discard(mux)

    def drain(self) -> None:
        """Drain every call being served, and every call that comes after."""
        self.draining = True
        for mux in list(self._live):
            mux.drain()
