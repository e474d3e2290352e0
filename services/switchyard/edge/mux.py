"""One long-lived bidirectional call carrying many requests, told apart by id.

The edge's cache lookups (`LookupFrames`) and generations (`GenerateFrames`) both travel
this way: a message on an open call costs a fraction of a call of its own. `MuxCall` owns
the call's two tasks:

* a writer puts the queued requests on the call (a caller that stops waiting never
  interrupts a write, which would make grpc.aio cancel the whole call). On a framed call
  (`pack` given) each message carries every request waiting when it is written, within a
  frame's limits (`switchyard.common.multiplex.FrameQueue`), held for company as `hold`
  allows (`CompanyHold`); otherwise one each;
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
import math
import random
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

from switchyard.common.multiplex import FrameHold, FrameQueue

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Request_contra = TypeVar("_Request_contra", contravariant=True)
_Response_co = TypeVar("_Response_co", covariant=True)

# A call takes no new work this long after it opened (plus up to this fraction more, at random).
STREAM_MAX_AGE_S: Final = 30.0
STREAM_MAX_AGE_JITTER: Final = 0.25
# How long an ended call waits for the peer to finish it before it is cancelled.
END_GRACE_S: Final = 5.0


# A frame waits for company only while at least this many requests may still join it.
FRAME_COMPANY: Final = 1
# ... or, on a busy edge, for this many mean gaps between arrivals (`CompanyHold.busy_gaps`).
BUSY_GAPS: Final = 2.0


# The weight of the newest gap in the running mean of the time between arrivals.
GAP_WEIGHT: Final = 0.2


class Arrivals:
    """Requests at this edge that may still queue a cache lookup (`lookups`) or a generation
    start (`starts`): admitted, and not past that step yet; and all those admitted and not
    ended (`in_flight`), with the mean time between arrivals (`gap_s`, a running mean; infinite
    until two have come). Kept by the gateway, one `Arrival` per request. Frames held for them
    (`CompanyHold`) are nudged when a count falls below `FRAME_COMPANY`, so a frame never
    waits for a request that went another way (a cache hit, an error)."""

    __slots__ = ("_clock", "_held", "_last", "gap_s", "in_flight", "lookups", "starts")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.lookups = 0
        self.starts = 0
        self.in_flight = 0
        self.gap_s = math.inf
        self._clock = clock
        self._last: float | None = None
        self._held: weakref.WeakSet[FrameQueue[Any]] = weakref.WeakSet()

    def arrive(self) -> Arrival:
        """A request was admitted: it counts towards both steps until it passes them, and is
        in flight until it leaves."""
        now = self._clock()
        if self._last is not None:
            gap = now - self._last
            self.gap_s = gap if math.isinf(self.gap_s) else self.gap_s + (gap - self.gap_s) * GAP_WEIGHT
        self._last = now
        return Arrival(self)

    def watch(self, queue: FrameQueue[Any]) -> None:
        """Nudge `queue` when a count falls below `FRAME_COMPANY` (for as long as it lives)."""
        self._held.add(queue)

    def _left(self, count: int) -> None:
        """A request left a count, which is now `count`: held frames may have to go."""
        if count < FRAME_COMPANY:  # above it, every hold still says wait: nothing to tell
            for queue in self._held:
                queue.nudge()


class Arrival:
    """One request's place in `Arrivals`: it leaves each count once (`looked_up`,
    `started`), and `left` (at its end, however it ends) leaves what it had not, and the
    requests in flight."""

    __slots__ = ("_arrivals", "_flying", "_lookup", "_start")

    def __init__(self, arrivals: Arrivals) -> None:
        self._arrivals = arrivals
        self._lookup = self._start = self._flying = True
        arrivals.lookups += 1
        arrivals.starts += 1
        arrivals.in_flight += 1

    def looked_up(self) -> None:
        """Its cache lookup is about to be queued, or it will not look up."""
        if self._lookup:
            self._lookup = False
            arrivals = self._arrivals
            arrivals.lookups -= 1
            arrivals._left(arrivals.lookups)

    def started(self) -> None:
        """Its generation start is about to be queued (or it needs none): past both steps."""
        self.looked_up()
        if self._start:
            self._start = False
            arrivals = self._arrivals
            arrivals.starts -= 1
            arrivals._left(arrivals.starts)

    def left(self) -> None:
        """The request ended, however it ended: it leaves every count it is still in."""
        self.started()
        if self._flying:
            self._flying = False
            self._arrivals.in_flight -= 1


class CompanyHold:
    """The edge's `FrameHold`: under concurrency, a lookup or a generation start waits up to
    `linger_s` for those of other requests, so that they share one message.

    A message on a gRPC call costs far more CPU than what it carries, and on a busy edge the
    requests reach each step one at a time, so unheld frames would carry one item each. A
    frame waits:

    * while at least `FRAME_COMPANY` requests admitted already may still join it (the
      `Arrivals` count of its `step`), for up to `linger_s`;
    * else, with `busy_gaps` above 0, when requests arrive more often than every `linger_s`
      (the mean gap) and others are in flight, for `busy_gaps` mean gaps (at most `linger_s`)
      or until one more item joins it, whichever comes first (the next request is likely to
      come in that time; waiting on for more would leave a lightly loaded edge idle). A
      request that runs straight from admission to this step (no lookup, no wait) never finds
      another admitted one on its way, so on a busy edge serving answers the cache may not
      hold, frames would otherwise carry one item each (measured on the bench mesh, unary at
      64 concurrent with the cache off: 1.03 starts per message without, 1.7 with).

    A lone request never waits (nothing else in flight), nor does one on an edge whose
    requests come further apart than `linger_s`. `linger_s` 0 turns holding off.
    """

    __slots__ = ("_arrivals", "_step", "busy_gaps", "linger_s")

    def __init__(
        self,
        linger_s: float,
        arrivals: Arrivals,
        step: Literal["lookups", "starts"],
        *,
        busy_gaps: float = 0.0,
    ) -> None:
        self.linger_s = linger_s
        self.busy_gaps = busy_gaps
        self._arrivals = arrivals
        self._step = step

    def __call__(self, gathered: int = 1) -> float:
        arrivals = self._arrivals
        coming: int = getattr(arrivals, self._step)
        if coming >= FRAME_COMPANY:
            return self.linger_s
        if self.busy_gaps > 0 and gathered < 2 and arrivals.in_flight > 1 and arrivals.gap_s < self.linger_s:
            return min(self.linger_s, self.busy_gaps * arrivals.gap_s)
        return 0.0

    def watch(self, queue: FrameQueue[Any]) -> None:
        """`queue` holds its frames with this: nudge it as requests pass their steps."""
        self._arrivals.watch(queue)


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
        hold: FrameHold | None = None,
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
        self._outgoing: FrameQueue[Any] = (
            FrameQueue(hold=hold) if pack is not None else FrameQueue(max_items=1)
        )
        if pack is not None and isinstance(hold, CompanyHold):
            hold.watch(self._outgoing)
        self._tasks = (
            asyncio.create_task(self._write(), name=f"{name}-out"),
            asyncio.create_task(self._read(), name=f"{name}-in"),
        )

    def send(self, request: _Request, now: float | None = None) -> None:
        """Queue `request` for the writer (never blocks); `now` saves reading the clock."""
        self.used = time.monotonic() if now is None else now
        self._outgoing.put(request)

    @property
    def queued(self) -> int:
        """Requests waiting for the writer (a frame in the making, when held)."""
        return len(self._outgoing)

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
