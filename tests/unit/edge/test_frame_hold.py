"""Frames held for company on a busy edge (`CompanyHold`, `Arrivals`): a lookup or a generation
start waits for the ones of requests on their way, never for nobody.

The far sides are fakes that record each frame written (`Framed.sizes`); every hold here is
60 s, so a frame that waited for nobody would time the test out rather than pass.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from switchyard.edge.generations import GenerationStreams
from switchyard.edge.mux import GAP_WEIGHT, Arrival, Arrivals, CompanyHold
from tests.unit.edge.test_stream_retirement import FakeAdapter, ask, starts, until

LONG_S = 60.0


def test_an_arrival_leaves_each_count_once_and_leaving_takes_what_it_had_not() -> None:
    arrivals = Arrivals()
    first, second = arrivals.arrive(), arrivals.arrive()
    assert (arrivals.lookups, arrivals.starts) == (2, 2)
    first.looked_up()
    first.looked_up()
    assert (arrivals.lookups, arrivals.starts) == (1, 2)
    first.started()
    first.left()
    assert (arrivals.lookups, arrivals.starts) == (1, 1)
    second.left()  # it ended (an error, say) before either step
    second.started()
    assert (arrivals.lookups, arrivals.starts) == (0, 0)


def test_a_hold_lasts_while_someone_is_coming_and_zero_turns_it_off() -> None:
    arrivals = Arrivals()
    hold = CompanyHold(0.005, arrivals, "lookups")
    assert hold() == 0.0
    arrival = arrivals.arrive()
    assert hold() == 0.005
    assert hold(3) == 0.005  # however many it holds, while one is on its way
    arrival.looked_up()
    assert hold() == 0.0
    arrivals.arrive()
    assert CompanyHold(0.0, arrivals, "lookups")() == 0.0


class Ticks:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_arrivals_keep_the_requests_in_flight_and_the_mean_gap_between_them() -> None:
    clock = Ticks()
    arrivals = Arrivals(clock)
    first = arrivals.arrive()
    assert arrivals.in_flight == 1 and arrivals.gap_s == math.inf  # no gap until a second comes
    clock.now += 0.010
    second = arrivals.arrive()
    assert arrivals.gap_s == pytest.approx(0.010)  # the first gap is the mean
    clock.now += 0.020
    arrivals.arrive().left()
    assert arrivals.gap_s == pytest.approx(0.010 + (0.020 - 0.010) * GAP_WEIGHT)
    assert arrivals.in_flight == 2
    first.started()  # past its steps, still in flight (answering)
    assert arrivals.in_flight == 2
    first.left()
    first.left()
    second.left()
    assert (arrivals.in_flight, arrivals.lookups, arrivals.starts) == (0, 0, 0)


def test_a_busy_edge_holds_a_frame_for_the_next_arrival_and_a_lone_or_quiet_one_never() -> None:
    clock = Ticks()
    arrivals = Arrivals(clock)
    hold = CompanyHold(0.005, arrivals, "starts", busy_gaps=2.0)
    answering = arrivals.arrive()
    answering.started()  # a request past its start, waiting on its answer
    clock.now += 0.001
    arrivals.arrive().started()  # one every millisecond: the next is likely within 2 ms
    assert arrivals.in_flight == 2
    assert hold() == pytest.approx(0.002)
    assert hold(2) == 0.0  # one more joined: the frame goes rather than wait on
    assert CompanyHold(0.005, arrivals, "starts")() == 0.0  # busy_gaps 0: only those on their way
    assert CompanyHold(0.0015, arrivals, "starts", busy_gaps=2.0)() == 0.0015  # at most linger_s
    answering.left()
    assert hold() == 0.0  # alone in flight: nobody to wait for
    clock.now += 1.0
    quiet = arrivals.arrive()  # a second apart now: the mean gap grows past linger_s
    quiet.started()
    assert arrivals.in_flight == 2 and arrivals.gap_s > 0.005
    assert hold() == 0.0


async def test_on_a_busy_edge_a_start_waits_for_the_next_arrival_and_they_share_a_message() -> None:
    """The next request is not admitted yet when the first start is queued (nothing is on its
    way), so only the arrival rate says it is worth waiting for."""
    adapter, clock = FakeAdapter(), Ticks()
    arrivals = Arrivals(clock)
    hold = CompanyHold(LONG_S, arrivals, "starts", busy_gaps=2.0)
    generations = GenerationStreams(adapter, streams=1, hold=hold)  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(10):  # a frame held for nobody would wait 60 s
            await lone_start(adapter, arrivals, generations, 0)  # opens the stream, goes at once
            clock.now += 0.1  # requests come 0.1 s apart
            arrivals.arrive().started()  # in flight, answering
            clock.now += 0.1
            arrivals.arrive().started()
            assert hold() == pytest.approx(0.2)
            generations.generate(ask(), timeout_s=30)
            for _ in range(10):
                await asyncio.sleep(0)
            assert starts(adapter.calls[0]) == [1]  # held: one more is expected within 0.2 s
            clock.now += 0.1
            arrivals.arrive().started()
            generations.generate(ask(), timeout_s=30)  # joins the held frame
            await until(lambda: starts(adapter.calls[0]) == [1, 2, 3])
            assert adapter.framed[0].sizes == [1, 2]
    finally:
        generations.close()


async def test_a_busy_hold_ends_when_its_time_is_up_though_nobody_came() -> None:
    adapter, clock = FakeAdapter(), Ticks()
    arrivals = Arrivals(clock)
    hold = CompanyHold(LONG_S, arrivals, "starts", busy_gaps=2.0)
    generations = GenerationStreams(adapter, streams=1, hold=hold)  # type: ignore[arg-type]
    try:
        await lone_start(adapter, arrivals, generations, 0)
        clock.now += 0.02  # they come 20 ms apart: a held start waits up to 40 ms
        arrivals.arrive().started()
        clock.now += 0.02
        arrivals.arrive().started()
        assert hold() == pytest.approx(0.04)
        generations.generate(ask(), timeout_s=30)
        await until(lambda: starts(adapter.calls[0]) == [1, 2])
        assert adapter.framed[0].sizes == [1, 1]
    finally:
        generations.close()


def held_streams(count: int) -> tuple[FakeAdapter, Arrivals, GenerationStreams]:
    """Generation streams whose starts are held for company (60 s)."""
    adapter, arrivals = FakeAdapter(), Arrivals()
    hold = CompanyHold(LONG_S, arrivals, "starts")
    return adapter, arrivals, GenerationStreams(adapter, streams=count, hold=hold)  # type: ignore[arg-type]


async def lone_start(
    adapter: FakeAdapter, arrivals: Arrivals, generations: GenerationStreams, call: int
) -> None:
    """A lone request's start: it goes at once, as the only one on `adapter.calls[call]`."""
    arrivals.arrive().started()
    generations.generate(ask(), timeout_s=30)
    await until(lambda: len(adapter.calls) > call and len(starts(adapter.calls[call])) == 1)


async def held_start(adapter: FakeAdapter, arrivals: Arrivals, generations: GenerationStreams) -> Arrival:
    """A start held on the first call for a second request on its way (returned)."""
    first, second = arrivals.arrive(), arrivals.arrive()
    first.started()
    before = starts(adapter.calls[0])
    generations.generate(ask(), timeout_s=30)
    for _ in range(10):
        await asyncio.sleep(0)
    assert starts(adapter.calls[0]) == before  # held for the second request
    return second


async def test_a_start_waits_for_one_on_its_way_and_they_share_a_stream_and_a_message() -> None:
    adapter, arrivals, generations = held_streams(2)
    try:
        await lone_start(adapter, arrivals, generations, 0)  # opens the first stream
        await lone_start(adapter, arrivals, generations, 1)  # the next in turn: opens the second
        second = await held_start(adapter, arrivals, generations)  # back on the first: held...
        second.started()
        generations.generate(ask(), timeout_s=30)  # ... until this joins it, not the next in turn
        await until(lambda: starts(adapter.calls[0]) == [1, 3, 4])
        assert len(adapter.calls) == 2 and adapter.framed[0].sizes == [1, 2]
        assert starts(adapter.calls[1]) == [2]
    finally:
        generations.close()


async def test_a_held_start_goes_as_soon_as_the_request_it_waits_for_goes_another_way() -> None:
    adapter, arrivals, generations = held_streams(1)
    try:
        await lone_start(adapter, arrivals, generations, 0)
        second = await held_start(adapter, arrivals, generations)
        second.left()  # a cache hit, say: it will start nothing
        await until(lambda: starts(adapter.calls[0]) == [1, 2])
        assert adapter.framed[0].sizes == [1, 1]
    finally:
        generations.close()
