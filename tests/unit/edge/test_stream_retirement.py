"""Multiplexed calls retired by age, against fake calls whose far side the test plays.

A call past its maximum age takes no new work: its slot's next request opens a fresh call
(so replicas added by a scale-out get traffic from busy edges). The old call stays open
until the work on it is over, with every answer delivered and every queued message written,
then ends quietly (the edge closes its side, the peer finishes the call): nothing fails and
nothing is reported lost. A retired call that fails first still fails what waits on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from switchyard.common import answer_events
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.edge import cache as edge_cache_module
from switchyard.edge import generations as generations_module
from switchyard.edge.cache import StreamedLookups
from switchyard.edge.generations import Generation, GenerationStreams
from switchyard.edge.mux import STREAM_MAX_AGE_JITTER, MuxCall
from switchyard.v1 import cache_pb2, common_pb2, provider_pb2
from tests.support.frames import Framed

MAX_AGE_S = 10.0
PAST_AGE_S = MAX_AGE_S * (1 + STREAM_MAX_AGE_JITTER) + 0.1  # past any stream's jittered age


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata())


class FakeCall:
    """A stream-stream call whose far side the test plays: it records what the edge did
    (`events`: ("write", message), "done_writing", "cancel"), answers with `answer`, breaks
    with `fail`, and ends the call once the edge has closed its side (as the servers do)."""

    def __init__(self, *, hold_writes: bool = False) -> None:
        self.events: list[Any] = []
        self.half_closed = False
        self.cancelled = False
        self.end_when_half_closed = True
        self.writable = asyncio.Event()  # cleared: writes wait (a slow connection)
        if not hold_writes:
            self.writable.set()
        self._answers: asyncio.Queue[Any] = asyncio.Queue()

    @property
    def written(self) -> list[Any]:
        return [event[1] for event in self.events if isinstance(event, tuple)]

    @property
    def ended(self) -> bool:
        return self.half_closed or self.cancelled

    async def write(self, request: Any) -> None:
        await self.writable.wait()
        if self.ended:  # as grpc.aio refuses a write on a finished call
            raise asyncio.InvalidStateError("RPC already finished.")
        self.events.append(("write", request))

    async def done_writing(self) -> None:
        self.events.append("done_writing")
        self.half_closed = True
        if self.end_when_half_closed:
            self._answers.put_nowait(None)

    def answer(self, response: Any) -> None:
        self._answers.put_nowait(response)

    def fail(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self._answers.put_nowait(rpc_error(code))

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> Any:
        item = await self._answers.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> bool:
        if self.cancelled:
            return False
        self.events.append("cancel")
        self.cancelled = True
        self._answers.put_nowait(rpc_error(grpc.StatusCode.CANCELLED))
        return True


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class FakeAdapter:
    """An adapter stub: each GenerateFrames call is a `FakeCall` (one item to a frame)."""

    def __init__(self) -> None:
        self.calls: list[FakeCall] = []
        self.framed: list[Framed] = []
        self.hold_writes = False

    def GenerateFrames(self) -> Framed:
        call = FakeCall(hold_writes=self.hold_writes)
        self.calls.append(call)
        self.framed.append(Framed(call, provider_pb2.GenerateFramesResponse))
        return self.framed[-1]

    def GenerateStream(self) -> FakeCall:
        raise AssertionError("generations go on GenerateFrames")

    def Generate(self, request: provider_pb2.GenerateRequest, *, timeout: float | None = None) -> Any:
        raise AssertionError("generations go on GenerateFrames")


class FakeCache:
    """A cache stub: each LookupFrames call is a `FakeCall` (one item to a frame)."""

    def __init__(self) -> None:
        self.calls: list[FakeCall] = []
        self.hold_writes = False

    def LookupFrames(self) -> Framed:
        call = FakeCall(hold_writes=self.hold_writes)
        self.calls.append(call)
        return Framed(call, cache_pb2.LookupFramesResponse)

    def LookupStream(self) -> FakeCall:
        raise AssertionError("lookups go on LookupFrames")

    async def StoreMany(self, request: cache_pb2.StoreManyRequest, *, timeout: float | None = None) -> Any:
        raise AssertionError("not used here")


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Let the calls' tasks run until `condition` holds (fails after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


@pytest.fixture
def losses(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Every loss a stream reports to its owner (generations and lookups alike)."""
    seen: list[BaseException] = []
    for owner in (generations_module._Stream, edge_cache_module._LookupCall):
        original = owner._lost

        def spy(self: Any, error: BaseException, original: Any = original) -> None:
            seen.append(error)
            original(self, error)

        monkeypatch.setattr(owner, "_lost", spy)
    return seen


@pytest.fixture(autouse=True)
def no_task_errors(caplog: pytest.LogCaptureFixture) -> Any:
    """No task of a call ends with an unretrieved error (asyncio would log it)."""
    yield
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelname in ("ERROR", "WARNING")]


# Generations -------------------------------------------------------------------------------


def ask() -> provider_pb2.GenerateRequest:
    request = common_pb2.ChatRequest(model="openai/gpt-4o-mini")
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="hi")])
    return provider_pb2.GenerateRequest(request=request, provider="openai", upstream_model="gpt-4o-mini")


def part(generation_id: int, *texts: str, done: bool = False) -> provider_pb2.GenerateStreamResponse:
    events = [provider_pb2.GenerateResponse(delta=common_pb2.Delta(text=t)) for t in texts]
    if done:
        events.append(
            provider_pb2.GenerateResponse(
                done=provider_pb2.GenerateDone(finish_reason=common_pb2.FINISH_REASON_STOP)
            )
        )
    return provider_pb2.GenerateStreamResponse(id=generation_id, events=answer_events.pack(events))


async def text_of(generation: Generation) -> str:
    return "".join(
        [event.delta.text async for message in generation for event in answer_events.unpack(message)]
    )


def starts(call: FakeCall) -> list[int]:
    return [m.id for m in call.written if m.HasField("start")]


def streams(clock: Clock, adapter: FakeAdapter, count: int = 1) -> GenerationStreams:
    return GenerationStreams(adapter, streams=count, max_age_s=MAX_AGE_S, clock=clock)  # type: ignore[arg-type]


async def test_a_stream_past_its_age_takes_no_new_generation_and_its_slot_opens_a_fresh_one(
    losses: list[BaseException],
) -> None:
    clock, adapter = Clock(), FakeAdapter()
    generations = streams(clock, adapter)
    try:
        generations.generate(ask(), timeout_s=30)
        clock.now += MAX_AGE_S - 0.1
        generations.generate(ask(), timeout_s=30)
        assert len(adapter.calls) == 1  # within its age: the same stream
        clock.now += PAST_AGE_S - (MAX_AGE_S - 0.1)
        generations.generate(ask(), timeout_s=30)
        assert len(adapter.calls) == 2
        old, new = adapter.calls
        await until(lambda: starts(old) == [1, 2] and starts(new) == [3])
        assert not old.ended  # two generations still wait on it
    finally:
        generations.close()


async def test_generations_on_a_retired_stream_get_every_answer_and_it_ends_after_the_last(
    losses: list[BaseException],
) -> None:
    clock, adapter = Clock(), FakeAdapter()
    generations = streams(clock, adapter)
    try:
        first = generations.generate(ask(), timeout_s=30)
        second = generations.generate(ask(), timeout_s=30)
        clock.now += PAST_AGE_S
        third = generations.generate(ask(), timeout_s=30)
        old, new = adapter.calls
        await until(lambda: starts(old) == [1, 2] and starts(new) == [3])

        old.answer(part(1, "Hel"))
        old.answer(part(2, "wor"))
        old.answer(part(1, "lo", done=True))
        assert await text_of(first) == "Hello"
        await asyncio.sleep(0.01)
        assert not old.ended  # the second still waits: the stream stays open for it

        old.answer(part(2, "ld", done=True))
        assert await text_of(second) == "world"
        await until(lambda: old.cancelled)
        # Closed only after the last answer: the edge's side first, then the peer's end.
        assert old.events[-2:] == ["done_writing", "cancel"]
        assert not new.ended

        new.answer(part(3, "new", done=True))
        assert await text_of(third) == "new"
    finally:
        generations.close()
    assert [str(e) for e in losses] == ["closed"]  # the close at the end; retiring lost nothing


async def test_a_cancel_on_a_retired_stream_is_written_before_the_stream_ends(
    losses: list[BaseException],
) -> None:
    clock, adapter = Clock(), FakeAdapter()
    generations = streams(clock, adapter)
    adapter.hold_writes = True  # the old stream's writes wait (a slow connection)
    first = generations.generate(ask(), timeout_s=30)
    adapter.hold_writes = False
    clock.now += PAST_AGE_S
    second = generations.generate(ask(), timeout_s=30)
    old, new = adapter.calls
    first.cancel()  # the last generation on the old stream leaves it, its cancel still queued
    assert not old.ended
    old.writable.set()
    await until(lambda: old.cancelled)
    assert [m.WhichOneof("action") for m in old.written] == ["start", "cancel"]
    assert old.events[-2:] == ["done_writing", "cancel"]
    new.answer(part(2, "ok", done=True))
    assert await text_of(second) == "ok"
    generations.close()
    assert len(losses) == 1  # the close


async def test_a_retired_stream_that_fails_fails_its_generations_as_an_unavailable_adapter(
    losses: list[BaseException],
) -> None:
    clock, adapter = Clock(), FakeAdapter()
    generations = streams(clock, adapter)
    try:
        first = generations.generate(ask(), timeout_s=30)
        clock.now += PAST_AGE_S
        second = generations.generate(ask(), timeout_s=30)
        old, new = adapter.calls
        old.answer(part(1, "par"))
        assert [e.delta.text for e in answer_events.unpack(await anext(first))] == ["par"]
        old.fail()  # the old replica goes away mid-answer
        with pytest.raises(SwitchyardError) as caught:
            await text_of(first)
        new.answer(part(2, "fine", done=True))
        assert await text_of(second) == "fine"  # the fresh stream is untouched
    finally:
        generations.close()
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        Reason.DEPENDENCY_UNAVAILABLE,
    )
    assert caught.value.metadata["cause"] == "UNAVAILABLE"
    assert isinstance(losses[0], grpc.aio.AioRpcError)


async def test_an_old_stream_nothing_waits_on_ends_at_once(losses: list[BaseException]) -> None:
    clock, adapter = Clock(), FakeAdapter()
    generations = streams(clock, adapter, count=2)
    try:
        for _ in range(2):  # one generation on each of the two slots, answered
            generation = generations.generate(ask(), timeout_s=30)
            call = adapter.calls[-1]
            call.answer(part(len(adapter.calls), "x", done=True))
            assert await text_of(generation) == "x"
        clock.now += PAST_AGE_S
        generations.generate(ask(), timeout_s=30)
        assert len(adapter.calls) == 3
        # Turns go round the slots: the first's slot is next, so its stream is replaced and
        # (nothing waiting on it) ends at once; the other slot's turn has not come yet.
        await until(lambda: adapter.calls[0].cancelled)
        assert adapter.calls[0].events[-2:] == ["done_writing", "cancel"]
        assert not adapter.calls[1].ended
    finally:
        generations.close()
    assert all(str(e) == "closed" for e in losses)


async def test_closing_fails_the_generations_still_on_a_retired_stream(losses: list[BaseException]) -> None:
    clock, adapter = Clock(), FakeAdapter()
    generations = streams(clock, adapter)
    first = generations.generate(ask(), timeout_s=30)
    clock.now += PAST_AGE_S
    generations.generate(ask(), timeout_s=30)
    generations.close()
    with pytest.raises(SwitchyardError) as caught:
        await text_of(first)
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    await until(lambda: all(call.cancelled for call in adapter.calls))


# The call itself ---------------------------------------------------------------------------


async def test_an_ended_call_the_peer_does_not_finish_is_cancelled_after_the_grace() -> None:
    call = FakeCall()
    call.end_when_half_closed = False
    lost: list[BaseException] = []
    mux: MuxCall[str, str] = MuxCall(
        call,  # type: ignore[arg-type]
        deliver=lambda _: None,
        lost=lost.append,
        name="test",
        end_grace_s=0.05,
    )
    mux.send("last")
    mux.end()
    await until(lambda: call.half_closed)
    assert mux.open and not call.cancelled  # the peer has the grace to finish
    await until(lambda: call.cancelled)
    assert call.events == [("write", "last"), "done_writing", "cancel"]
    assert not mux.open and lost == []


async def test_each_call_retires_at_its_own_jittered_age() -> None:
    calls = [
        MuxCall(FakeCall(), deliver=lambda _: None, lost=lambda _: None, name="t", now=0.0, max_age_s=10.0)  # type: ignore[arg-type, var-annotated]
        for _ in range(40)
    ]
    ages = [mux.retire_at for mux in calls]
    for mux in calls:
        mux.fail(ConnectionError("done"))
    assert all(10.0 <= age <= 10.0 * (1 + STREAM_MAX_AGE_JITTER) for age in ages)
    assert len(set(ages)) > 30  # spread, so slots and edges do not all reopen at once


# Lookups -----------------------------------------------------------------------------------


def lookup(text: str = "hi") -> cache_pb2.LookupRequest:
    request = common_pb2.ChatRequest(model="openai/gpt-4o-mini")
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])
    return cache_pb2.LookupRequest(tenant_id="acme", request=request, model="openai/gpt-4o-mini")


def hit(lookup_id: int) -> cache_pb2.LookupStreamResponse:
    return cache_pb2.LookupStreamResponse(
        id=lookup_id, lookup=cache_pb2.LookupResponse(status=common_pb2.CACHE_STATUS_HIT_EXACT)
    )


def asked(call: FakeCall) -> list[int]:
    return [m.id for m in call.written]


async def test_a_lookup_call_past_its_age_is_replaced_and_ends_once_its_lookups_are_answered(
    losses: list[BaseException],
) -> None:
    clock, cache = Clock(), FakeCache()
    lookups = StreamedLookups(cache, max_age_s=MAX_AGE_S, clock=clock)  # type: ignore[arg-type]
    try:
        first = asyncio.create_task(lookups.ask(lookup(), timeout_s=5))
        await until(lambda: len(cache.calls) == 1 and asked(cache.calls[0]) == [1])
        clock.now += MAX_AGE_S - 0.1
        second = asyncio.create_task(lookups.ask(lookup(), timeout_s=5))
        await until(lambda: asked(cache.calls[0]) == [1, 2])
        clock.now += PAST_AGE_S
        third = asyncio.create_task(lookups.ask(lookup(), timeout_s=5))
        await until(lambda: len(cache.calls) == 2 and asked(cache.calls[1]) == [3])
        old, new = cache.calls

        old.answer(hit(2))
        assert (await second).status == common_pb2.CACHE_STATUS_HIT_EXACT
        await asyncio.sleep(0.01)
        assert not old.ended  # the first still waits
        old.answer(hit(1))
        assert (await first).status == common_pb2.CACHE_STATUS_HIT_EXACT
        await until(lambda: old.cancelled)
        assert old.events[-2:] == ["done_writing", "cancel"]
        new.answer(hit(3))
        assert (await third).status == common_pb2.CACHE_STATUS_HIT_EXACT
        assert not new.ended
    finally:
        lookups.close()
    assert [str(e) for e in losses] == ["closed"]


async def test_a_lookup_queued_on_a_retired_call_is_written_before_it_ends(
    losses: list[BaseException],
) -> None:
    # The lookup's caller gives up while its message still waits to be written: nothing
    # waits on the old call any more, but the message goes out before the call is closed.
    clock, cache = Clock(), FakeCache()
    lookups = StreamedLookups(cache, max_age_s=MAX_AGE_S, clock=clock)  # type: ignore[arg-type]
    cache.hold_writes = True
    given_up = asyncio.create_task(lookups.ask(lookup(), timeout_s=0.05))
    await until(lambda: len(cache.calls) == 1)
    cache.hold_writes = False
    clock.now += PAST_AGE_S
    answered = asyncio.create_task(lookups.ask(lookup(), timeout_s=5))
    with pytest.raises(TimeoutError):
        await given_up
    old, new = cache.calls
    assert old.events == []
    old.writable.set()
    await until(lambda: old.cancelled)
    assert old.events == [("write", old.written[0]), "done_writing", "cancel"]
    assert asked(old) == [1]
    await until(lambda: asked(new) == [2])
    new.answer(hit(2))
    assert (await answered).status == common_pb2.CACHE_STATUS_HIT_EXACT
    lookups.close()
    assert [str(e) for e in losses] == ["closed"]


async def test_a_retired_lookup_call_that_fails_fails_its_lookups(losses: list[BaseException]) -> None:
    clock, cache = Clock(), FakeCache()
    lookups = StreamedLookups(cache, max_age_s=MAX_AGE_S, clock=clock)  # type: ignore[arg-type]
    try:
        waiting = asyncio.create_task(lookups.ask(lookup(), timeout_s=5))
        await until(lambda: len(cache.calls) == 1 and asked(cache.calls[0]) == [1])
        clock.now += PAST_AGE_S
        answered = asyncio.create_task(lookups.ask(lookup(), timeout_s=5))
        await until(lambda: len(cache.calls) == 2 and asked(cache.calls[1]) == [2])
        old, new = cache.calls
        old.fail()
        with pytest.raises(ConnectionError, match="lookup stream lost"):
            await waiting
        new.answer(hit(2))
        assert (await answered).status == common_pb2.CACHE_STATUS_HIT_EXACT
    finally:
        lookups.close()
    assert isinstance(losses[0], grpc.aio.AioRpcError)
