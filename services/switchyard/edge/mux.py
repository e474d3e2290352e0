"""One long-lived bidirectional call carrying many requests, told apart by id.

The edge's cache lookups (`LookupStream`) and generations (`GenerateStream`) both travel
this way: a message on an open call costs a fraction of a call of its own. `MuxCall` owns
the call's two tasks:

* a writer puts the queued messages on the call one at a time (a caller that stops waiting
  never interrupts a write, which would make grpc.aio cancel the whole call);
* a reader hands every answer to `deliver` (which routes it by id).

When the call ends or fails, `lost` is called once with why, the tasks stop, and the owner
opens another call for what comes next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Generic, Protocol, TypeVar

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Request_contra = TypeVar("_Request_contra", contravariant=True)
_Response_co = TypeVar("_Response_co", covariant=True)


class BidiCall(Protocol[_Request_contra, _Response_co]):
    """What `MuxCall` uses of a grpc.aio stream-stream call."""

    async def write(self, request: _Request_contra) -> None: ...

    def __aiter__(self) -> AsyncIterator[_Response_co]: ...

    def cancel(self) -> bool: ...


class MuxCall(Generic[_Request, _Response]):
    """One open call, its writer and its reader."""

    def __init__(
        self,
        call: BidiCall[_Request, _Response],
        *,
        deliver: Callable[[_Response], None],
        lost: Callable[[BaseException], None],
        name: str,
    ) -> None:
        self.call = call
        self.open = True
        self.used = time.monotonic()
        """When a request was last sent (for owners that reopen idle calls)."""
        self._deliver = deliver
        self._lost = lost
        self._outgoing: asyncio.Queue[_Request] = asyncio.Queue()
        self._tasks = (
            asyncio.create_task(self._write(), name=f"{name}-out"),
            asyncio.create_task(self._read(), name=f"{name}-in"),
        )

    def send(self, request: _Request) -> None:
        """Queue `request` for the writer (never blocks)."""
        self.used = time.monotonic()
        self._outgoing.put_nowait(request)

    async def _write(self) -> None:
        try:
            while True:
                await self.call.write(await self._outgoing.get())
        except Exception as exc:  # the call ended or failed
            self.fail(exc)

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self._deliver(response)
        except Exception as exc:
            self.fail(exc)
        else:
            self.fail(ConnectionError("the peer ended the call"))

    def fail(self, error: BaseException) -> None:
        """End the call (once): cancel it and its tasks, then tell the owner why."""
        if not self.open:
            return
        self.open = False
        self.call.cancel()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._lost(error)
