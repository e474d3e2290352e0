"""A deadline for each of a loop of waits, kept by one lazily re-armed timer.

`asyncio.timeout` around every read of a stream schedules and cancels a timer per read: on
the token path (a read per chunk) that is a few microseconds each, for a deadline that
almost never passes. `IdleDeadline` gives each wait in its `with` block `idle_s`, as a
fresh `asyncio.timeout(idle_s)` would, with one timer: entering a wait only moves the
deadline; the timer, when it fires early (the deadline moved since it was set), is set
again for the deadline as it now is, so a steady stream costs at most one timer per
`idle_s`. When a wait outlives its deadline, the task is cancelled and the wait raises
`TimeoutError`, exactly as `asyncio.timeout` does (a cancellation from elsewhere stays a
cancellation). `close()` drops the timer (call it when the loop of waits is over).
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class IdleDeadline:
    """`with deadline:` around each wait; see the module's docstring."""

    __slots__ = ("_cancelling", "_deadline", "_expired", "_handle", "_idle_s", "_loop", "_task", "_waiting")

    def __init__(self, idle_s: float) -> None:
        self._idle_s = idle_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._waiting = False
        self._expired = False
        self._cancelling = 0

    def __enter__(self) -> IdleDeadline:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("IdleDeadline should be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._expired = False
        self._waiting = True
        self._deadline = loop.time() + self._idle_s
        if self._handle is None:
            self._handle = loop.call_at(self._deadline, self._fire)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._waiting = False
        if self._expired:
            self._expired = False
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc_value

    def _fire(self) -> None:
        self._handle = None
        if not self._waiting:
            return  # between waits: the next one sets the timer again
        assert self._loop is not None and self._task is not None
        if self._loop.time() < self._deadline:
            self._handle = self._loop.call_at(self._deadline, self._fire)
            return
        self._expired = True
        self._task.cancel()

    def close(self) -> None:
        """No more waits: drop the timer."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
