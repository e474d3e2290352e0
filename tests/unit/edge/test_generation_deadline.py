"""A generation keeps its caller's deadline with one timer, against fake calls the test plays.

The deadline ends a generation that waits past it (DEADLINE_EXCEEDED, reason TIMEOUT, and a
`cancel` to the adapter), after every answer that came before it; a generation that ends
first leaves no timer behind (nothing keeps it alive until its deadline).
"""

from __future__ import annotations

import asyncio
import gc
import weakref

import grpc
import pytest

from switchyard.common import answer_events
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.edge.generations import GenerationStreams
from tests.unit.edge.test_stream_retirement import FakeAdapter, ask, part, starts, until


def texts(message: object) -> list[str]:
    events = answer_events.unpack(message)  # type: ignore[arg-type]
    return [event.delta.text for event in events if event.HasField("delta")]


async def test_answers_that_came_before_the_deadline_are_read_then_it_ends_the_generation() -> None:
    adapter = FakeAdapter()
    generations = GenerationStreams(adapter, streams=1)  # type: ignore[arg-type]
    try:
        generation = generations.generate(ask(), timeout_s=0.1)
        call = adapter.calls[0]
        await until(lambda: starts(call) == [1])
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


async def test_a_generation_that_ends_before_its_deadline_leaves_no_timer_behind() -> None:
    adapter = FakeAdapter()
    generations = GenerationStreams(adapter, streams=1)  # type: ignore[arg-type]
    try:
        generation = generations.generate(ask(), timeout_s=300)
        call = adapter.calls[0]
        await until(lambda: starts(call) == [1])
        reading = asyncio.create_task(anext(generation))
        await asyncio.sleep(0.01)  # it waits: its timer is set
        call.answer(part(1, "hi", done=True))
        assert texts(await reading) == ["hi"]
        gone = weakref.ref(generation)
        del generation, reading
        gc.collect()
        assert gone() is None  # no timer holds it until its deadline, five minutes away
    finally:
        generations.close()


async def test_a_generation_the_caller_cancels_leaves_no_timer_behind() -> None:
    adapter = FakeAdapter()
    generations = GenerationStreams(adapter, streams=1)  # type: ignore[arg-type]
    try:
        generation = generations.generate(ask(), timeout_s=300)
        call = adapter.calls[0]
        reading = asyncio.create_task(anext(generation))
        await asyncio.sleep(0.01)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        generation.cancel()
        await until(lambda: [m.WhichOneof("action") for m in call.written] == ["start", "cancel"])
        gone = weakref.ref(generation)
        del generation, reading
        gc.collect()
        assert gone() is None
    finally:
        generations.close()
