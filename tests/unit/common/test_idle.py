"""`IdleDeadline`: each wait gets the idle time, as `asyncio.timeout` would, with one timer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from switchyard.common.idle import IdleDeadline


async def test_a_wait_that_outlives_the_idle_time_times_out() -> None:
    deadline = IdleDeadline(0.05)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        with deadline:
            await asyncio.sleep(5)
    assert 0.04 <= time.monotonic() - started < 1.0
    deadline.close()


async def test_each_wait_gets_the_whole_idle_time_however_long_the_waits_add_up_to() -> None:
    deadline = IdleDeadline(0.05)
    started = time.monotonic()
    for _ in range(8):
        with deadline:
            await asyncio.sleep(0.02)
    assert time.monotonic() - started > 0.15  # three idle times in all, none timed out
    await asyncio.sleep(0.1)  # a pause between waits is not a wait
    with deadline:
        await asyncio.sleep(0.02)
    with pytest.raises(TimeoutError):  # and it still ends a wait that outlives it
        with deadline:
            await asyncio.sleep(5)
    deadline.close()


def counted_timers(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.TimerHandle]:
    """Every timer the running loop's `call_at` sets from now on."""
    loop = asyncio.get_running_loop()
    timers: list[asyncio.TimerHandle] = []
    call_at = loop.call_at

    def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        timers.append(call_at(when, callback, *args, **kwargs))
        return timers[-1]

    monkeypatch.setattr(loop, "call_at", counted)
    return timers


async def test_a_steady_stream_of_waits_costs_one_timer_not_one_each(monkeypatch: pytest.MonkeyPatch) -> None:
    timers = counted_timers(monkeypatch)
    deadline = IdleDeadline(10.0)
    for _ in range(50):
        with deadline:
            await asyncio.sleep(0)
    deadline.close()
    assert len(timers) == 1


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    deadline = IdleDeadline(10.0)

    async def wait() -> None:
        with deadline:
            await asyncio.sleep(5)

    task = asyncio.create_task(wait())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline.close()


async def test_closed_it_leaves_no_timer_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    timers = counted_timers(monkeypatch)
    deadline = IdleDeadline(300.0)
    with deadline:
        await asyncio.sleep(0)
    assert [t.cancelled() for t in timers] == [False]
    deadline.close()
    assert [t.cancelled() for t in timers] == [True]  # nothing fires, or holds it, for five minutes
