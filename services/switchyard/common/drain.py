"""Ending a servicer's long-lived streams at shutdown, so the grace period is not spent on them.

A watch stream (`WatchRoutes`, `Watch`, `WatchBudgets`) would never end by itself, and a
commit stream only when its caller stops: left alone, each holds the server's whole grace
period and is then cut. A servicer keeps one `StreamDrain` for them; its `drain` (the
service's `ServiceParts.drain`) makes each stream send what it already has queued and end
cleanly (status OK), so the subscriber reconnects -- through the proxy, to another replica --
at once, and makes new calls be refused with the `shutting_down` error.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final, Literal, TypeVar

from switchyard.common.errors import SwitchyardError, shutting_down

_Item = TypeVar("_Item")


class _Drained(enum.Enum):
    DRAINED = "drained"


DRAINED: Final = _Drained.DRAINED
"""What `StreamDrain.next` returns once shutdown began and nothing is left to send."""

Drained = Literal[_Drained.DRAINED]


class _Pending(enum.Enum):
    TIMED_OUT = "timed out"
    ENDED = "ended"


class StreamDrain:
    """Whether shutdown has begun for one servicer's long-lived streams, and waiting on it."""

    def __init__(self, service: str) -> None:
        self.refusal: SwitchyardError = shutting_down(service)
        """What a call arriving while draining is refused with."""
        self._draining = False
        # Resolved by `drain`; made on first use, inside the running loop.
        self._drained: asyncio.Future[None] | None = None

    @property
    def draining(self) -> bool:
        """Shutdown has begun: streams end as soon as they have sent what they hold."""
        return self._draining

    def drain(self) -> None:
        """Shutdown begins: end every stream waiting for more, and refuse new ones."""
        self._draining = True
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def refuse_if_draining(self) -> None:
        """Raise the `shutting_down` refusal if shutdown has begun (a handler's first line)."""
        if self._draining:
            raise self.refusal

    async def next(self, queue: asyncio.Queue[_Item], *, timeout_s: float | None = None) -> _Item | Drained:
        """The next item of a subscriber's `queue` (one already queued comes first, even while
        draining); `DRAINED` once shutdown began with the queue empty. `TimeoutError` when
        nothing came within `timeout_s`."""
        if not queue.empty():
            return queue.get_nowait()
        result = await self._until_drained(queue.get(), timeout_s)
        if result is _Pending.TIMED_OUT:
            raise TimeoutError
        return result

    async def until_drained(self, requests: AsyncIterator[_Item]) -> AsyncIterator[_Item]:
        """The caller's `requests` until it ends them or shutdown begins; no request is read
        after that (a request the caller sent meanwhile is left unread, never half-handled)."""
        iterator = aiter(requests)
        while True:
            request = await self._until_drained(_next_or_end(iterator), None)
            if request is DRAINED or request is _Pending.ENDED:
                return
            assert request is not _Pending.TIMED_OUT  # no timeout given
            yield request

    async def _until_drained(
        self, work: Coroutine[Any, Any, _Item], timeout_s: float | None
    ) -> _Item | Drained | Literal[_Pending.TIMED_OUT]:
        """`work`'s result, or `DRAINED` (and `work` cancelled) if shutdown begins first."""
        if self._draining:
            work.close()
            return DRAINED
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait((task, self._drained), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                # Cancelling a queue's `get` or a call's read takes nothing from either.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not task.cancelled():
            return task.result()  # what arrived is handed on, even when shutdown began with it
        return DRAINED if self._draining else _Pending.TIMED_OUT


async def _next_or_end(iterator: AsyncIterator[_Item]) -> _Item | Literal[_Pending.ENDED]:
    # StopAsyncIteration must not escape into a task's result.
    return await anext(iterator, _Pending.ENDED)
