"""Frames held for company on a busy edge (`CompanyHold`, `Arrivals`): a lookup or a generation
start waits for the ones of requests on their way, never for nobody.

The far sides are fakes that record each frame written (`Framed.sizes`); every hold here is
60 s, so a frame that waited for nobody would time the test out rather than pass.
"""

from __future__ import annotations

import asyncio

from switchyard.edge.generations import GenerationStreams
from switchyard.edge.mux import Arrival, Arrivals, CompanyHold
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
    arrival.looked_up()
    assert hold() == 0.0
    arrivals.arrive()
    assert CompanyHold(0.0, arrivals, "lookups")() == 0.0


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
