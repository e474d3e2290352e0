"""One long-lived bidirectional call carrying many requests, told apart by id.

The edge's cache lookups (`LookupFrames`) and generations (`GenerateFrames`) both travel
this way: a message on an open call costs a fraction of a call of its own. `MuxCall` owns
the call's two tasks:

* a writer puts the queued requests on the call (a caller that stops waiting never
  interrupts a write, which would make grpc.aio cancel the whole call). On a framed call
  (`pack` given) each message carries every request waiting when it is written, within a
  frame's limits (`switchyard.common.multiplex.FrameQueue`); otherwise one each;
* a reader hands every answer (each item of a framed message, `unpack`) to `deliver`
  (which routes it by id).

When the call ends or fails, `lost` is called once with why, the tasks stop, and the owner
opens another call for what comes next.

A call is retired by age (`retire_at`: `STREAM_MAX_AGE_S` after it opened, plus up to
`STREAM_MAX_AGE_JITTER` of that, chosen at random so calls do not all turn over at once), as
a server's MAX_CONNECTION_AGE would, but from the caller's side and losing nothing: a call
that stays open under load would otherwise stay on the replica it first reached, and a
replica added when the peer's deployment scales out would get none of its work. The owner
gives an old call no new work (the next request opens a fresh call, which may reach another
replica through Envoy) and calls `end` once nothing waits on it: the writer puts on what is
queued, closes its side, and the peer ends the call once it has answered; that end is
routine, never reported to `lost`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Final, Generic, Protocol, TypeVar

from switchyard.common.multiplex import FrameQueue

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Request_contra = TypeVar("_Request_contra", contravariant=True)
_Response_co = TypeVar("_Response_co", covariant=True)

# A call takes no new work this long after it opened (plus up to this fraction more, at random).
STREAM_MAX_AGE_S: Final = 30.0
STREAM_MAX_AGE_JITTER: Final = 0.25
# How long an ended call waits for the peer to finish it before it is cancelled.
END_GRACE_S: Final = 5.0


class BidiCall(Protocol[_Request_contra, _Response_co]):
    """What `MuxCall` uses of a grpc.aio stream-stream call."""

    async def write(self, request: _Request_contra) -> None: ...

    async def done_writing(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[_Response_co]: ...

    def cancel(self) -> bool: ...


class MuxCall(Generic[_Request, _Response]):
    """One open call, its writer and its reader."""

    def __init__(
        self,
        call: BidiCall[Any, Any],
        *,
        deliver: Callable[[_Response], None],
        lost: Callable[[BaseException], None],
        name: str,
        now: float | None = None,
        max_age_s: float = STREAM_MAX_AGE_S,
        end_grace_s: float = END_GRACE_S,
        pack: Callable[[list[_Request]], object] | None = None,
        unpack: Callable[[Any], Iterable[_Response]] | None = None,
    ) -> None:
        self.call = call
        self.open = True
        self.used = time.monotonic() if now is None else now
        """When a request was last sent (for owners that reopen idle calls)."""
        self.retire_at = self.used + max_age_s * random.uniform(1.0, 1.0 + STREAM_MAX_AGE_JITTER)
        """From when the call takes no new work (on the clock `now` came from)."""
        self.ending = False
        """`end` was called: nothing waits on the call, and no more goes on it."""
        self._end_grace_s = end_grace_s
        self._deliver = deliver
        self._lost = lost
        self._pack = pack
        self._unpack = unpack
        self._outgoing: FrameQueue[Any] = FrameQueue() if pack is not None else FrameQueue(max_items=1)
        self._tasks = (
            asyncio.create_task(self._write(), name=f"{name}-out"),
            asyncio.create_task(self._read(), name=f"{name}-in"),
        )

    def send(self, request: _Request, now: float | None = None) -> None:
        """Queue `request` for the writer (never blocks); `now` saves reading the clock."""
        self.used = time.monotonic() if now is None else now
        self._outgoing.put(request)

    def end(self) -> None:
        """The owner is done with the call (nothing waits on it): write what is queued, close
        this side, and let the peer end the call (cancelled after `end_grace_s`), quietly."""
        if self.open and not self.ending:
            self.ending = True
            self._outgoing.close()

    async def _write(self) -> None:
        try:
            while (frame := await self._outgoing.frame()) is not None:
                await self.call.write(frame[0] if self._pack is None else self._pack(frame))
            await self.call.done_writing()
        except Exception as exc:  # the call ended or failed
            self.fail(exc)
            return
        # The peer ends the call once it has answered what it runs; the reader sees that end.
        await asyncio.wait((self._tasks[1],), timeout=self._end_grace_s)
        self._close()

    async def _read(self) -> None:
        try:
            unpack = self._unpack
            async for message in self.call:
                if unpack is None:
                    self._deliver(message)
                else:
                    for response in unpack(message):
                        self._deliver(response)
        except Exception as exc:
            self.fail(exc)
        else:
            self.fail(ConnectionError("the peer ended the call"))

    def fail(self, error: BaseException) -> None:
        """End the call (once): cancel it and its tasks, then tell the owner why (unless the
        owner ended it: nothing waits on it then, so its end is no loss)."""
        if self.open:
            self._close()
            if not self.ending:
                self._lost(error)

    def _close(self) -> None:
        if not self.open:
            return
        self.open = False
        self.call.cancel()  # a call the peer already ended stays as it is
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
