"""Overload control: a concurrency limit per edge replica, admitted by priority.

Every chat request holds one slot while it runs. With a slot free, a request is admitted at
once. When the edge is full, requests wait in a queue ordered by rank (the request's
priority first, then its tenant's tier, then arrival) and the best-ranked waiter gets the
next free slot. So under overload the important work goes first and the rest is refused
early and cheaply, instead of everyone timing out:

* `LOW` priority is shed as soon as the edge is `shed_low_at` full (a fraction of the limit),
  before any queueing;
* a full queue sheds its worst-ranked waiter to make room for a better-ranked newcomer, or
  refuses the newcomer when nobody waiting ranks below it;
* a waiter gives up after `queue_timeout_s` (or its own deadline, whichever is first).

Refusals are `UNAVAILABLE` with reason `OVERLOADED` and a retry hint. Admission runs before
the rate limiter charges anything, so a shed request costs the tenant nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import grpc

from switchyard.common.errors import Reason, SwitchyardError
from switchyard.v1 import common_pb2

# Request priority -> rank; unspecified counts as normal.
_PRIORITY_RANK: Final = {
    common_pb2.PRIORITY_UNSPECIFIED: 2,
    common_pb2.PRIORITY_LOW: 1,
    common_pb2.PRIORITY_NORMAL: 2,
    common_pb2.PRIORITY_HIGH: 3,
    common_pb2.PRIORITY_CRITICAL: 4,
}
# Tiers in order of precedence under overload; unknown tiers rank lowest.
TIER_ORDER: Final = ("free", "pro", "expert", "master")
RETRY_HINT_S: Final = 1.0


def rank(priority: common_pb2.Priority.ValueType, tier: str) -> tuple[int, int]:
    """(request priority, tenant tier): higher is admitted first."""
    tier_rank = TIER_ORDER.index(tier) if tier in TIER_ORDER else -1
    return _PRIORITY_RANK.get(priority, 2), tier_rank


def _overloaded(why: str, **metadata: str) -> SwitchyardError:
    return SwitchyardError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.OVERLOADED,
        f"the gateway is overloaded: {why}; retry shortly",
        metadata=metadata,
        retry_after_s=RETRY_HINT_S,
    )


@dataclass(order=True)
class _Waiter:
    # heapq is a min-heap: the best rank must sort first, so ranks are negated.
    sort_key: tuple[int, int, int]
    future: asyncio.Future[None] = field(compare=False)
    rank: tuple[int, int] = field(compare=False)


class AdmissionController:
    """The slots of one edge replica and the priority queue in front of them."""

    def __init__(
        self, max_concurrent: int, *, max_queue: int, queue_timeout_s: float, shed_low_at: float = 0.8
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._low_limit = max(1, int(max_concurrent * shed_low_at))
        self.in_flight = 0
        self._queue: list[_Waiter] = []
        self._order = itertools.count()
        self.shed = 0
        """Requests refused as overloaded since start (for stats and tests)."""

    @property
    def queued(self) -> int:
        return sum(1 for waiter in self._queue if not waiter.future.done())

    @contextlib.asynccontextmanager
    async def slot(
        self, request_rank: tuple[int, int], timeout_s: float | None = None
    ) -> AsyncIterator[None]:
        """Hold one slot for the body; raises OVERLOADED when none can be had in time."""
        await self._acquire(request_rank, timeout_s)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, request_rank: tuple[int, int], timeout_s: float | None) -> None:
        priority = request_rank[0]
        if priority <= _PRIORITY_RANK[common_pb2.PRIORITY_LOW] and self.in_flight >= self._low_limit:
            self.shed += 1
            raise _overloaded("low-priority requests are shed first", shed="low_priority")
        if self.in_flight < self.max_concurrent and not self.queued:
            self.in_flight += 1
            return
        if self.queued >= self.max_queue and not self._evict_worse_than(request_rank):
            self.shed += 1
            raise _overloaded("the admission queue is full", shed="queue_full")
        waiter = _Waiter(
            (-request_rank[0], -request_rank[1], next(self._order)),
            asyncio.get_running_loop().create_future(),
            request_rank,
        )
        heapq.heappush(self._queue, waiter)
        wait_s = self.queue_timeout_s if timeout_s is None else min(self.queue_timeout_s, timeout_s)
        try:
            async with asyncio.timeout(wait_s):
                await waiter.future
        except BaseException as exc:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release()  # the slot was handed over just as the wait ended: pass it on
            else:
                future.cancel()
            if isinstance(exc, TimeoutError):
                self.shed += 1
                raise _overloaded("no slot freed up in time", shed="queue_timeout") from None
            raise
        # The slot was handed over by `_release` (in_flight already counts it).

    def _evict_worse_than(self, request_rank: tuple[int, int]) -> bool:
        """Refuse the worst-ranked waiter if it ranks below `request_rank`."""
        live = [waiter for waiter in self._queue if not waiter.future.done()]
        if not live:
            return False
        worst = max(live)  # largest sort key = lowest rank, latest arrival
        if worst.rank >= request_rank:
            return False
        self.shed += 1
        worst.future.set_exception(_overloaded("displaced by higher-priority work", shed="displaced"))
        return True

    def _release(self) -> None:
        while self._queue:
            waiter = heapq.heappop(self._queue)
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot passes straight to the waiter
                return
        self.in_flight -= 1
