"""A generation keeps its caller's deadline with one timer, against fake calls the test plays.

The deadline ends a generation that waits past it (DEADLINE_EXCEEDED, reason TIMEOUT, and a
`cancel` to the adapter), after every answer that came before it; a generation that ends
first leaves no timer behind (nothing keeps it alive until its deadline).
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from switchyard.common import answer_events
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.edge.generations import Generation, GenerationStreams
from tests.unit.edge.test_stream_retirement import FakeAdapter, FakeCall, ask, part, starts, until


def texts(message: object) -> list[str]:
    events = answer_events.unpack(message)  # type: ignore[arg-type]
    return [event.delta.text for event in events if event.HasField("delta")]


async def started(timeout_s: float) -> tuple[GenerationStreams, Generation, FakeCall]:
    """A generation on one stream of a fake adapter, its start written (close the streams after)."""
    adapter = FakeAdapter()
    generations = GenerationStreams(adapter, streams=1)  # type: ignore[arg-type]
    generation = generations.generate(ask(), timeout_s=timeout_s)
    call = adapter.calls[0]
    try:
        await until(lambda: starts(call) == [1])
    except BaseException:
        generations.close()
        raise
    return generations, generation, call


async def test_answers_that_came_before_the_deadline_are_read_then_it_ends_the_generation() -> None:
    generations, generation, call = await started(timeout_s=0.1)
    try:
        call.answer(part(1, "Hel"))
        assert texts(await anext(generation)) == ["Hel"]  # its timer is set: it waited
        call.answer(part(1, "lo"))
        await asyncio.sleep(0.2)  # the deadline passes with an answer unread
        assert texts(await anext(generation)) == ["lo"]
        with pytest.raises(SwitchyardError) as caught:
            await anext(generation)
        assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT)
        await until(lambda: [m.WhichOneof("action") for m in call.written] == ["start", "cancel"])
        with pytest.raises(StopAsyncIteration):
            await anext(generation)  # over
    finally:
        generations.close()


async def freed_after(end: Callable[[Generation, FakeCall, asyncio.Task[Any]], Awaitable[None]]) -> bool:
    """Start a generation with a deadline five minutes away, let it wait for an answer (its
    timer is then set), have `end` end it; whether nothing holds it any more once dropped."""
    generations, generation, call = await started(timeout_s=300)
    try:
        reading = asyncio.create_task(anext(generation))
        await asyncio.sleep(0.01)  # it waits: its timer is set
        await end(generation, call, reading)
        gone = weakref.ref(generation)
        del generation, reading
        gc.collect()
        return gone() is None
    finally:
        generations.close()


async def test_a_generation_that_ends_before_its_deadline_leaves_no_timer_behind() -> None:
    async def answered(generation: Generation, call: FakeCall, reading: asyncio.Task[Any]) -> None:
        call.answer(part(1, "hi", done=True))
        assert texts(await reading) == ["hi"]

    assert await freed_after(answered)  # no timer holds it until its deadline


async def test_a_generation_the_caller_cancels_leaves_no_timer_behind() -> None:
    async def cancelled(generation: Generation, call: FakeCall, reading: asyncio.Task[Any]) -> None:
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        generation.cancel()
        await until(lambda: [m.WhichOneof("action") for m in call.written] == ["start", "cancel"])

    assert await freed_after(cancelled)
